"""`palsd simulate`: every policy through one scenario on the twin, in virtual time, in parallel,
plus the hindsight sweep of fixed (cap, batch limit) pairs that picks `best_fixed`.

Exit status: 0 when every target of the scenario is met, 1 when one is missed (report.json's
`targets` says which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from palsd.sim.policies import POLICIES, fixed_name
from palsd.sim.scenarios import MODELS, N_GPUS, SCENARIOS, build_scenario, sweep_caps_w

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


def _run(job: tuple[str, str, float, int, str, str, bool]) -> Any:
    from palsd.sim.simulate import run_policy

    return [run_policy(*job)]


def _run_chain(job: tuple[int, tuple[float, ...], tuple[str, float, int, str, str]]) -> Any:
    """One batch limit of the sweep, caps from the highest down. At a fixed batch limit a lower
    cap can only slow the GPUs (the firmware meets a lower limit with a lower clock), so once a
    cap misses the SLO every lower cap would too: the chain stops there and the lower pairs are
    reported as not run for that reason."""
    from palsd.sim.simulate import run_policy

    batch, caps, base = job
    out = []
    for cap in caps:
        res = run_policy(fixed_name(cap, batch), *base, True)
        out.append(res)
        if res.aborted and res.seconds_above_budget == 0:
            break
    return out


def _dispatch(job: Any) -> Any:
    return _run_chain(job) if isinstance(job[0], int) else _run(job)


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


def _curve(gpu: str, model: str, out: Path) -> dict[str, Any]:
    """The preset's tokens/J-against-cap curve at a saturating load (the twin's own
    characterisation, palsd.sim.characterise), written beside the report as
    efficiency_curve.json and .png, so a reader sees which regime the run is in."""
    from palsd.sim.characterise import efficiency_curve, write_efficiency_curve

    curve = efficiency_curve(gpu, model)
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
    setup = MODELS[args.model]
    scenario = build_scenario(args.scenario, args.seed)
    duration_s = args.hours * 3600.0
    # Measure the capacities once here, so forked workers inherit them instead of each
    # measuring them again.
    capacity_per_s(args.gpu, setup.model, setup.tp)
    if scenario.long_share is not None:
        capacity_per_s(args.gpu, setup.model, setup.tp, long=True)
    base = (args.scenario, args.hours, args.seed, args.model, args.gpu)
    jobs: list[Any] = [(p, *base, False) for p in names if p != BEST_FIXED]
    skipped: list[tuple[float, int]] = []
    not_run: list[tuple[float, int]] = []  # below a cap that missed the SLO at that batch
    pairs: list[tuple[float, int]] = []
    if BEST_FIXED in names:
        budgets = [
            scenario.budget_w(args.gpu, s * duration_s, duration_s)
            for s, _ in scenario.budget.steps
        ]
        lowest = min((b for b in budgets if b is not None), default=None)
        pairs, skipped = sweep_pairs(args.gpu, lowest)
        for batch in SWEEP_BATCHES:
            caps = tuple(sorted((c for c, b in pairs if b == batch), reverse=True))
            if caps:
                jobs.append((batch, caps, base))
    started = time.perf_counter()
    cpu0 = time.process_time() + _children_cpu_s()
    if args.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            batches = list(pool.imap_unordered(_dispatch, jobs, chunksize=1))
    else:
        batches = [_dispatch(j) for j in jobs]
    runs = [r for b in batches for r in b]
    wall_s = time.perf_counter() - started
    cpu_s = time.process_time() + _children_cpu_s() - cpu0
    if BEST_FIXED in names:
        done = {(r.policy) for r in runs}
        for c, b in pairs:
            if fixed_name(c, b) not in done:
                not_run.append((c, b))
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
        "command": (
            f"palsd simulate --scenario {args.scenario} --gpu {args.gpu} --model {args.model} "
            f"--hours {args.hours:g} --seed {args.seed} --jobs {args.jobs} --out {args.out}"
        ),
    }
    meta["runs"] = len(runs)
    meta["efficiency_curve"] = _curve(args.gpu, setup.model, args.out)
    order = {p: i for i, p in enumerate(names)}
    runs.sort(key=lambda r: order.get(r.policy, len(order)))
    result = report.write(args.out, meta, runs, skipped, not_run)
    print((args.out / "report.md").read_text())
    print(f"{len(runs)} runs in {wall_s:.1f} s wall, {cpu_s:.1f} s CPU ({args.jobs} processes)")
    missed = [t for t in result["targets"] if not t["met"]]
    return 1 if missed else 0
