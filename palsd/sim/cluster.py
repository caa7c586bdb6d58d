"""`palsd simulate --scenario cluster --hosts 3`: a group of 8-GPU hosts under one group budget
on the twin, in virtual time, PALS's cluster setup: `static_share` (each host's palsd at a fixed
1/N of the group budget) against `fleet` (the coordinator's allocation, palsd/core/allocation.py,
moving power to the hosts that need it).

Every host is a twin host (palsd.sim.scenarios.build_host) with its own load shape (busy early,
busy late, a peak in the middle), each run by palsd's controller (policy `palsd`) on the
observations the daemon would build. The group budget binds: floors plus 35% of the limit range.

The fleet policy recomputes the allocation every COORDINATOR_PERIOD_S from what each host would
publish (floor, maximum, demand, SLO urgency); a lowering applies at once, a raise one period
later and only into what the lowered hosts have freed, as the protocol's acknowledgement makes
it (docs/fleet.md). Accounting: group power is the NVML 1 s average summed over the hosts,
checked against the group budget every 0.1 s after the first second; an SLO window (10 s) of a
host is violated when any of its servers misses its SLO.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palsd.core.allocation import HostNeed, allocate
from palsd.core.safety import order_writes
from palsd.core.slo import headroom, quantile_of
from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    GpuObservation,
    Observation,
    ServerObservation,
)
from palsd.fleet.host_status import (
    URGENCY_FULL,
    URGENCY_RELAXED,
    gpu_demand_w,
    host_demand_w,
)
from palsd.sense.signals import Scrape, derive
from palsd.sim.policies import make_policy
from palsd.sim.scenarios import (
    MODELS,
    ModelSetup,
    Scenario,
    Trace,
    budget_from_fraction,
    build_host,
)
from palsd.sim.simulate import host_energy_j

POLICIES = ("static_share", "fleet")
CONTROL_PERIOD_S = 0.5
COORDINATOR_PERIOD_S = 1.0
SUB_STEP_S = 0.1
SLO_WINDOW_S = 10.0
SIGNAL_WINDOW_S = 10.0
SETTLE_S = 1.0
GROUP_FRAC = 0.35  # per host: floor + 35% of the limit range
UTILISATION = 0.8
# Load shapes (fraction of the run -> multiplier), cycled over the hosts.
# One host busy at a time (PALS's uneven cluster): the group budget would meet every host's
# SLO if the busy one could use what the quiet ones leave; a fixed third cannot.
SHAPES: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.0, 1.1), (0.3, 1.1), (0.36, 0.3), (1.0, 0.3)),
    ((0.0, 0.3), (0.3, 0.3), (0.36, 1.1), (0.63, 1.1), (0.69, 0.3), (1.0, 0.3)),
    ((0.0, 0.3), (0.63, 0.3), (0.69, 1.1), (1.0, 1.1)),
)


@dataclass
class HostRun:
    host: Any
    ctrl: Any
    windows: list[deque[Scrape]]
    budget_w: float
    tokens0: float = 0.0
    energy0: float = 0.0


@dataclass
class ClusterResult:
    policy: str
    hosts: int
    group_budget_w: float
    tokens: float = 0.0
    energy_j: float = 0.0
    virtual_s: float = 0.0
    slo_windows: int = 0
    slo_violation_windows: int = 0
    seconds_above_budget: float = 0.0
    max_group_power_w: float = 0.0
    max_budget_sum_w: float = 0.0  # the most the hosts' budgets ever summed to
    wall_s: float = 0.0
    budgets_w: dict[str, list[float]] = field(default_factory=dict)
    violations_by_host: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        host_j = host_energy_j(self.energy_j, self.virtual_s * self.hosts)
        return {
            "slo_violation_windows": self.slo_violation_windows,
            "slo_windows": self.slo_windows,
            "tokens_per_joule_host": self.tokens / host_j if host_j > 0 else 0.0,
            "tokens_per_joule": self.tokens / self.energy_j if self.energy_j > 0 else 0.0,
            "seconds_above_budget": self.seconds_above_budget,
            "max_group_power_w": self.max_group_power_w,
            "max_budget_sum_w": self.max_budget_sum_w,
            "tokens": self.tokens,
            "energy_j": self.energy_j,
            "wall_s": self.wall_s,
            "mean_budget_w": {h: sum(v) / len(v) for h, v in self.budgets_w.items() if v},
            "slo_violation_windows_by_host": self.violations_by_host,
        }


def _scenario(i: int) -> Scenario:
    return Scenario(
        name=f"cluster-host{i}",
        description="one host of the cluster scenario",
        budget=Trace(((0.0, None),)),
        utilisation=UTILISATION,
        load=SHAPES[i % len(SHAPES)],
    )


def _observe(run: HostRun, setup: ModelSetup, now_s: float) -> Observation:
    servers = []
    for srv in run.host.servers:
        w = run.windows[srv.index]
        w.append(Scrape(now_s, run.host.scrape(srv.index)))
        while len(w) > 2 and w[0].at_s < now_s - SIGNAL_WINDOW_S:
            w.popleft()
        signals = derive((w[0], w[-1]) if len(w) > 1 else (w[0],)).server
        state = run.host.batch_state(srv.index)
        servers.append(
            ServerObservation(
                name=srv.name,
                url=f"twin://{srv.name}",
                gpu_indices=tuple(srv.gpu_indices),
                slo=setup.slo,
                signals=signals,
                batch_limit=int(state["limit"]),
                max_num_seqs=int(state["max_num_seqs"]),
            )
        )
    budget = BudgetInForce(run.budget_w, BudgetSource.FACILITY)
    return Observation(now_s, tuple(run.host.gpu_readings()), tuple(servers), budget)


def _need(name: str, obs: Observation) -> HostNeed:
    gpus = [_gpu_dict(g) for g in obs.gpus]
    floor = sum(g.min_limit_w for g in obs.gpus)
    top = sum(g.max_limit_w for g in obs.gpus)
    worst = None
    for s in obs.servers:
        if s.signals is not None:
            h = headroom(s.slo, s.signals).worst
            if h is not None:
                worst = h if worst is None else min(worst, h)
    span = URGENCY_RELAXED - URGENCY_FULL
    urgency = 0.0 if worst is None else min(1.0, max(0.0, (URGENCY_RELAXED - worst) / span))
    demand = host_demand_w(sum(gpu_demand_w(g) for g in gpus), floor, top, urgency)
    return HostNeed(name, floor, demand, top, urgency)


def _gpu_dict(g: GpuObservation) -> dict[str, Any]:
    return {
        "min_limit_w": g.min_limit_w,
        "max_limit_w": g.max_limit_w,
        "power_limit_w": g.power_limit_w,
        "power_w": g.power_w,
    }


def _window_met(host: Any, setup: ModelSetup, index: int) -> bool:
    sig = host.server_signals(index, SLO_WINDOW_S)
    if not headroom(setup.slo, sig).meets():
        return False
    no_first_token = quantile_of(sig.ttft_s, setup.slo.ttft_quantile) is None
    return not (sig.waiting >= 1 and no_first_token and sig.generation_tokens_per_s <= 0)


def run_cluster(
    policy: str, hosts: int, hours: float, seed: int, model: str, gpu: str = "h100"
) -> ClusterResult:
    setup = MODELS[model]
    duration_s = hours * 3600.0
    group_w = hosts * budget_from_fraction(gpu, GROUP_FRAC)
    share_w = group_w / hosts
    runs = []
    for i in range(hosts):
        host = build_host(setup, _scenario(i), seed + i, gpu, duration_s)
        windows: list[deque[Scrape]] = [deque() for _ in host.servers]
        runs.append(HostRun(host, make_policy("palsd"), windows, share_w))
    res = ClusterResult(policy, hosts, group_w)
    for r in runs:
        r.tokens0 = sum(r.host.tokens_generated_total(s.index) for s in r.host.servers)
        r.energy0 = r.host.energy_j_total()
    names = [f"host{i}" for i in range(hosts)]
    res.budgets_w = {n: [] for n in names}
    pending: dict[int, float] = {}  # fleet: raises waiting for the next period
    steps = round(duration_s / SUB_STEP_S)
    per_control = round(CONTROL_PERIOD_S / SUB_STEP_S)
    per_coord = round(COORDINATOR_PERIOD_S / SUB_STEP_S)
    per_window = round(SLO_WINDOW_S / SUB_STEP_S)
    started = time.perf_counter()
    obs: list[Observation | None] = [None] * hosts
    k = 0
    for k in range(steps):
        now_s = k * SUB_STEP_S
        if policy == "fleet" and k % per_coord == 0 and all(o is not None for o in obs):
            # Raises decided last period, into what the lowered hosts have freed since.
            for i, want in sorted(pending.items()):
                room = group_w - sum(r.budget_w for j, r in enumerate(runs) if j != i)
                runs[i].budget_w = max(runs[i].budget_w, min(want, room))
            needs = [_need(names[i], o) for i, o in enumerate(obs) if o is not None]
            alloc = allocate(group_w, needs)
            pending = {}
            for i, r in enumerate(runs):
                target = alloc.watts[names[i]]
                if target <= r.budget_w:
                    r.budget_w = target  # lowering: at once
                else:
                    pending[i] = target  # raise: after the acknowledgement
        res.max_budget_sum_w = max(res.max_budget_sum_w, sum(r.budget_w for r in runs))
        if k % per_control == 0:
            for i, r in enumerate(runs):
                o = _observe(r, setup, now_s)
                obs[i] = o
                decision = r.ctrl.decide(o)
                current = {g.index: g.power_limit_w for g in o.gpus}
                for index, limit_w in order_writes(current, decision.power_limits_w):
                    r.host.set_power_limit_w(index, limit_w)
                for srv in o.servers:
                    want = decision.batch_limits.get(srv.name)
                    if want is not None and want != srv.batch_limit:
                        idx = next(s.index for s in r.host.servers if s.name == srv.name)
                        r.host.set_batch_limit(idx, int(want))
                res.budgets_w[names[i]].append(r.budget_w)
        power_w = 0.0
        for r in runs:
            r.host.step(SUB_STEP_S)
            power_w += sum(g.power_w or 0.0 for g in r.host.gpu_readings())
        if now_s + SUB_STEP_S > SETTLE_S:
            res.max_group_power_w = max(res.max_group_power_w, power_w)
            if power_w > group_w:
                res.seconds_above_budget += SUB_STEP_S
        if (k + 1) % per_window == 0:
            for name, r in zip(names, runs, strict=True):
                res.slo_windows += 1
                if not all(_window_met(r.host, setup, s.index) for s in r.host.servers):
                    res.slo_violation_windows += 1
                    res.violations_by_host[name] = res.violations_by_host.get(name, 0) + 1
    res.wall_s = time.perf_counter() - started
    res.virtual_s = (k + 1) * SUB_STEP_S
    for r in runs:
        res.tokens += sum(r.host.tokens_generated_total(s.index) for s in r.host.servers) - (
            r.tokens0
        )
        res.energy_j += r.host.energy_j_total() - r.energy0
    return res


def _job(args: tuple[str, int, float, int, str, str]) -> ClusterResult:
    return run_cluster(*args)


def targets(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    s, f = results["static_share"], results["fleet"]
    ratio = s["slo_violation_windows"] / max(f["slo_violation_windows"], 1)
    return {
        "fleet_slo_violation_windows_4x_fewer": {
            "value": ratio,
            "met": f["slo_violation_windows"] * 4 <= s["slo_violation_windows"],
        },
        "fleet_tokens_per_joule_host_no_lower": {
            "value": f["tokens_per_joule_host"] / max(s["tokens_per_joule_host"], 1e-12),
            "met": f["tokens_per_joule_host"] >= s["tokens_per_joule_host"],
        },
        "fleet_seconds_above_budget_zero": {
            "value": f["seconds_above_budget"],
            "met": f["seconds_above_budget"] == 0,
        },
    }


def main(args: Any) -> int:
    """Called by `palsd simulate` for --scenario cluster."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hosts = int(getattr(args, "hosts", 3) or 3)
    jobs = [(p, hosts, args.hours, args.seed, args.model, args.gpu) for p in POLICIES]
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), max(1, args.jobs))) as pool:
        done = pool.map(_job, jobs)
    results = {r.policy: r.summary() for r in done}
    report = {
        "scenario": "cluster",
        "hosts": hosts,
        "gpus_per_host": 8,
        "model": args.model,
        "gpu": args.gpu,
        "hours": args.hours,
        "seed": args.seed,
        "group_budget_w": done[0].group_budget_w,
        "policies": results,
        "targets": targets(results),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    for name, r in results.items():
        print(
            f"{name:13s} slo_violation_windows {r['slo_violation_windows']:4d}/{r['slo_windows']}"
            f"  tokens_per_joule_host {r['tokens_per_joule_host']:.4f}"
            f"  seconds_above_budget {r['seconds_above_budget']:.1f}"
            f"  wall {r['wall_s']:.0f} s"
        )
    met = all(t["met"] for t in report["targets"].values())
    for key, t in report["targets"].items():
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else value
        print(f"target {key}: {shown} {'met' if t['met'] else 'MISSED'}")
    return 0 if met else 1
