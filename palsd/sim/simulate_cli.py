"""`palsd simulate`: every policy through one scenario on the twin, in virtual time, in parallel,
plus the hindsight sweep of fixed (cap, batch limit) pairs that picks `best_fixed`.

Exit status: 0 when every target of the scenario is met, 1 when one is missed (report.json's
`targets` says which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palsd.sim.policies import POLICIES, fixed_name, is_blind, make_policy
from palsd.sim.scenarios import MODELS, N_GPUS, SCENARIOS, build_scenario, sweep_caps_w
from palsd.sim.simulate import RunResult, fixed_pair_of

SWEEP_BATCHES = (32, 64, 128, 256)
SWEEP_STEP_W = 50.0
BEST_FIXED = "best_fixed"


def _gpu_choices() -> list[str]:
    from palsd.sim.gpu_model import GPU_PRESETS

    return sorted(GPU_PRESETS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", required=True, choices=[*SCENARIOS, "cluster"])
    parser.add_argument("--hosts", type=int, default=3, help="cluster: hosts in the group")
    parser.add_argument("--hours", type=float, default=1.0, help="virtual hours (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", choices=sorted(MODELS), default="mixtral")
    parser.add_argument("--gpu", choices=_gpu_choices(), default="h100")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    every = [*POLICIES, BEST_FIXED]
    parser.add_argument(
        "--policies",
        default=",".join(every),
        help=f"comma-separated subset of {','.join(every)} ({BEST_FIXED}: the fixed-pair sweep)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="runs in this many processes (default: one per CPU)",
    )


# The sweep's stop flags, one slot per batch limit: the highest cap that missed the SLO at
# that batch (0 while none has). A RawArray made before the pool forks, handed to each worker
# once by the pool's initializer: the only state shared between the processes.
_stop_at_w: Any = None


def _init_worker(stop_at_w: Any) -> None:
    global _stop_at_w
    _stop_at_w = stop_at_w


@dataclass(frozen=True)
class SimJob:
    """A policy run (`pair` None), a sweep pair's run, or the efficiency curve."""

    name: str
    pair: tuple[float, int] | None = None
    slot: int = -1  # the pair's batch limit's slot in the stop flags


def _work(job: SimJob, base: tuple[str, float, int, str, str]) -> Any:
    from palsd.sim.simulate import run_policy

    if job.name == _CURVE:
        from palsd.sim.characterise import efficiency_curve

        return efficiency_curve(base[4], MODELS[base[3]].model)
    if job.pair is None:
        return run_policy(job.name, *base)
    flags, slot, cap = _stop_at_w, job.slot, job.pair[0]
    stop = None if flags is None else (lambda: flags[slot] > cap)
    return run_policy(job.name, *base, True, stop=stop)


_CURVE = "efficiency_curve"


def _missed_slo(res: RunResult) -> bool:
    """The run first became infeasible by missing the SLO (a sweep run aborts there; a policy
    run shared with a pair goes on): at a fixed batch limit every lower cap misses too."""
    return not res.stopped and res.infeasible_by == "slo"


@dataclass
class SweepChain:
    """One batch limit of the sweep, caps from the highest down. At a fixed batch limit a lower
    cap can only slow the GPUs (the firmware meets a lower limit with a lower clock), so once a
    cap misses the SLO every lower cap would too: those pairs are not run (a run already
    started below it is stopped and its result dropped)."""

    batch: int
    caps: list[float]  # descending
    slot: int
    shared: set[float] = field(default_factory=set)  # caps whose run is a policy's run
    started: set[float] = field(default_factory=set)  # running or done
    done: set[float] = field(default_factory=set)
    missed_w: float = 0.0  # the highest cap that missed the SLO, 0 while none has

    def next_cap(self) -> float | None:
        for cap in self.caps:
            if cap < self.missed_w:
                return None
            if cap not in self.started and cap not in self.shared:
                return cap
        return None

    def ahead(self, cap: float) -> int:
        """Caps above `cap` not yet done: 0 when `cap` must run whatever they show."""
        return sum(1 for c in self.caps if c > cap and c not in self.done)


class SweepPlan:
    """What to run next, given what has finished. Longest first (feedback policies, then the
    blind ones, then the sweep from its highest caps) so the processes finish together; when a
    process would otherwise wait, a chain's next cap starts before the one above it has
    finished (speculatively: if that one misses, this run is stopped and dropped)."""

    def __init__(
        self,
        policies: list[str],
        chains: list[SweepChain],
        shared: dict[tuple[float, int], str],
        curve: bool,
    ) -> None:
        self.policies = list(policies)
        self.chains = chains
        self.shared = shared  # sweep pair -> the policy whose run is that pair's run
        self.curve = curve
        self.runs: list[RunResult] = []  # the policies'
        self.sweep: dict[tuple[float, int], RunResult] = {}
        self.dropped: list[RunResult] = []  # started early below a cap that then missed
        self.curve_result: Any = None
        self.stop_at_w: Any = None  # the shared flags, when runs are in parallel

    def next_job(self, speculate: bool) -> SimJob | None:
        if self.policies:
            return SimJob(self.policies.pop(0))
        open_ = [(c, cap) for c in self.chains if (cap := c.next_cap()) is not None]
        certain = [(c, cap) for c, cap in open_ if c.ahead(cap) == 0]
        if certain:
            return self._start(*max(certain, key=lambda cc: cc[0].batch))
        if self.curve:
            self.curve = False
            return SimJob(_CURVE)
        if speculate and open_:
            # the least speculative: fewest caps above it still running
            return self._start(*min(open_, key=lambda cc: (cc[0].ahead(cc[1]), -cc[0].batch)))
        return None

    def _start(self, chain: SweepChain, cap: float) -> SimJob:
        chain.started.add(cap)
        return SimJob(fixed_name(cap, chain.batch), (cap, chain.batch), chain.slot)

    def finished(self, job: SimJob, result: Any) -> None:
        if job.name == _CURVE:
            self.curve_result = result
            return
        res: RunResult = result
        if job.pair is None:
            self.runs.append(res)
            for pair, policy in self.shared.items():
                if policy == job.name:  # the same run, under the pair's name too
                    self._pair_done(pair, dataclasses.replace(res, policy=fixed_name(*pair)))
            return
        self._pair_done(job.pair, res)

    def _pair_done(self, pair: tuple[float, int], res: RunResult) -> None:
        cap, batch = pair
        chain = next(c for c in self.chains if c.batch == batch)
        chain.done.add(cap)
        if res.stopped or cap < chain.missed_w:
            self.dropped.append(res)  # below a cap that missed: reported as not run
            return
        self.sweep[pair] = res
        if _missed_slo(res) and cap > chain.missed_w:
            chain.missed_w = cap
            if self.stop_at_w is not None:
                self.stop_at_w[chain.slot] = cap
            for c in chain.caps:  # a lower cap's result that came in earlier is dropped
                if c < cap and (c, batch) in self.sweep:
                    self.dropped.append(self.sweep.pop((c, batch)))

    def sweep_runs(self) -> list[RunResult]:
        return list(self.sweep.values())

    def not_run(self) -> list[tuple[float, int]]:
        return [
            (c, ch.batch) for ch in self.chains for c in ch.caps if (c, ch.batch) not in self.sweep
        ]


def _execute(plan: SweepPlan, jobs: int, base: tuple[str, float, int, str, str]) -> None:
    """Run the plan's jobs in `jobs` processes (forked: they inherit the measured capacities),
    or here when jobs is 1."""
    if jobs <= 1:
        while (job := plan.next_job(speculate=False)) is not None:
            plan.finished(job, _work(job, base))
        return
    ctx = multiprocessing.get_context("fork")
    plan.stop_at_w = ctx.RawArray("d", len(plan.chains))
    running: dict[Future[Any], SimJob] = {}
    with ProcessPoolExecutor(jobs, ctx, _init_worker, (plan.stop_at_w,)) as pool:
        while True:
            while len(running) < jobs:
                job = plan.next_job(speculate=True)
                if job is None:
                    break
                running[pool.submit(_work, job, base)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                plan.finished(running.pop(f), f.result())


def sweep_pairs(gpu: str, lowest_budget_w: float | None) -> tuple[list[tuple[float, int]], list]:
    """(pairs to run, pairs infeasible by construction: their caps sum above the lowest budget
    of the run, so their limits alone would count as above budget)."""
    run: list[tuple[float, int]] = []
    skipped: list[tuple[float, int]] = []
    for cap in sweep_caps_w(gpu, SWEEP_STEP_W):
        for batch in SWEEP_BATCHES:
            over = lowest_budget_w is not None and N_GPUS * cap > lowest_budget_w + 1e-6
            (skipped if over else run).append((cap, batch))
    return run, skipped


def _curve(curve: Any, out: Path) -> dict[str, Any]:
    """The preset's tokens/J-against-cap curve at a saturating load (the twin's own
    characterisation, palsd.sim.characterise, measured as one of the jobs), written beside the
    report as efficiency_curve.json and .png, so a reader sees which regime the run is in."""
    from palsd.sim.characterise import write_efficiency_curve

    write_efficiency_curve(curve, out)
    return {
        "optimum_cap_w": curve.optimum_cap_w(True),
        "regime": curve.regime(True),
        "files": ["efficiency_curve.json", "efficiency_curve.png"],
    }


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(args: argparse.Namespace) -> int:
    if args.scenario == "cluster":  # a group of hosts under one budget: palsd/sim/cluster.py
        from palsd.sim.cluster import main as cluster_main

        return cluster_main(args)
    from palsd.sim import report
    from palsd.sim.scenarios import capacity_per_s

    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES and p != BEST_FIXED]
    if unknown or args.hours <= 0 or args.jobs < 1:
        print(f"palsd simulate: unknown policies {unknown}, non-positive --hours or --jobs")
        return 2
    started = time.perf_counter()
    cpu0 = time.process_time() + _children_cpu_s()
    setup = MODELS[args.model]
    scenario = build_scenario(args.scenario, args.seed)
    duration_s = args.hours * 3600.0
    # Measure the capacities once here, so forked workers inherit them instead of each
    # measuring them again.
    capacity_per_s(args.gpu, setup.model, setup.tp)
    if scenario.long_share is not None:
        capacity_per_s(args.gpu, setup.model, setup.tp, long=True)
    base = (args.scenario, args.hours, args.seed, args.model, args.gpu)
    policies = [p for p in names if p != BEST_FIXED]
    skipped: list[tuple[float, int]] = []
    chains: list[SweepChain] = []
    shared: dict[tuple[float, int], str] = {}
    if BEST_FIXED in names:
        budgets = [
            scenario.budget_w(args.gpu, s * duration_s, duration_s)
            for s, _ in scenario.budget.steps
        ]
        lowest = min((b for b in budgets if b is not None), default=None)
        pairs, skipped = sweep_pairs(args.gpu, lowest)
        for p in policies:
            pair = fixed_pair_of(p, scenario, args.seed, args.model, args.gpu, duration_s)
            if pair in pairs and pair not in shared:
                shared[pair] = p
        for batch in SWEEP_BATCHES:
            caps = sorted((c for c, b in pairs if b == batch), reverse=True)
            if caps:
                own = {c for c, b in shared if b == batch}
                chains.append(SweepChain(batch, caps, len(chains), own))
    # longest first: the feedback policies, then the fixed ones
    policies.sort(key=lambda p: is_blind(make_policy(p)))
    plan = SweepPlan(policies, chains, shared, curve=True)
    _execute(plan, args.jobs, base)
    runs = plan.runs + plan.sweep_runs()
    not_run = plan.not_run()
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() + _children_cpu_s() - cpu0
    from palsd.sim.gpu_model import GPU_PRESETS

    meta = {
        "scenario": args.scenario,
        "description": scenario.description,
        "model": setup.model,
        "gpu": args.gpu,
        "host": f"{N_GPUS} x {GPU_PRESETS[args.gpu].name}, {N_GPUS // setup.tp} servers at "
        f"TP={setup.tp}",
        "hours": args.hours,
        "seed": args.seed,
        "slo": (
            f"TTFT p{setup.slo.ttft_quantile * 100:.0f} <= {setup.slo.ttft_s} s, "
            f"ITL p{setup.slo.itl_quantile * 100:.0f} <= {setup.slo.itl_s} s"
        ),
        "capacity_requests_per_s": capacity_per_s(args.gpu, setup.model, setup.tp),
        "wall_s_all_policies": wall_s,
        "cpu_s_all_policies": cpu_s,
        "jobs": args.jobs,
        "runs": 0,
        "best_fixed_swept": BEST_FIXED in names,
        "best_fixed_shared": {fixed_name(*pair): p for pair, p in shared.items()},
        "command": (
            f"palsd simulate --scenario {args.scenario} --gpu {args.gpu} --model {args.model} "
            f"--hours {args.hours:g} --seed {args.seed} --jobs {args.jobs} --out {args.out}"
        ),
    }
    meta["runs"] = len(runs)
    # runs started early below a cap that then missed: their work, not their results
    meta["runs_dropped"] = {r.policy: round(r.cpu_s, 1) for r in plan.dropped}
    meta["efficiency_curve"] = _curve(plan.curve_result, args.out)
    order = {p: i for i, p in enumerate(names)}
    runs.sort(key=lambda r: order.get(r.policy, len(order)))
    result = report.write(args.out, meta, runs, skipped, not_run)
    print((args.out / "report.md").read_text())
    print(
        f"{len(runs)} runs ({len(shared)} of them a policy's run shared with its sweep pair) in "
        f"{wall_s:.1f} s wall, {cpu_s:.1f} s CPU with set-up ({args.jobs} processes); the whole "
        f"command with the report: {time.perf_counter() - started:.1f} s wall, "
        f"{time.process_time() + _children_cpu_s() - cpu0:.1f} s CPU"
    )
    missed = [t for t in result["targets"] if not t["met"]]
    return 1 if missed else 0
