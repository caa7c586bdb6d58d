"""The virtual-time runner: one policy on the twin through one scenario, measured.

Each run builds its own twin from the scenario and seed (so every policy sees the same arrivals
and the same budget trace), ticks the policy every control period with observations built the
way the daemon builds them: serving signals through palsd's own window code
(palsd.sense.signals, its default 10 s window) over what palsd's parser reads from each server's
/metrics page (histogram quantiles, not exact ones), and GPU readings with NVML's 1 s average in
100 ms bins plus read noise. Each decision is applied through safety.order_writes. A budget
change triggers an immediate extra tick, as the daemon's budget path does. Accounting (energy,
tokens, SLO windows, time above budget) reads the twin's truth at every sub-step.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from palsd.core.safety import order_writes
from palsd.core.slo import headroom, quantile_of
from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    GpuObservation,
    Observation,
    ServerObservation,
    ServerSignals,
)
from palsd.sense.signals import DEFAULT_WINDOW_S, Scrape, derive
from palsd.sim.policies import fixed_name, is_blind, make_policy
from palsd.sim.scenarios import (
    MODELS,
    N_GPUS,
    ModelSetup,
    Scenario,
    build_host,
    build_scenario,
)

CONTROL_PERIOD_S = 0.5
SUB_STEP_S = 0.1  # accounting resolution: power is checked against the budget this often
SIGNAL_WINDOW_S = DEFAULT_WINDOW_S  # the daemon's scrape window
SLO_WINDOW_S = 10.0  # the report's SLO window
SETTLE_S = 1.0  # allowance after each budget change before "above budget" counts
TIMELINE_EVERY_S = 5.0
# NVML power readings are specified to +/-5 W; the averaged reading is steadier than the
# instant one. Gaussian read noise with these standard deviations, seeded per run.
NOISE_AVG_W = 2.0
NOISE_INSTANT_W = 5.0
# Host power as PALS fitted it against IPMI on its 4 x A100 nodes (arXiv 2605.21427):
# P_sys = 1.05 x sum(P_GPU) + 340..350 W. The fixed part is taken at 345 W per host.
HOST_GPU_FACTOR = 1.05
HOST_FIXED_W = 345.0
TARGET_ATTAINMENT = 0.99


def host_energy_j(gpu_energy_j: float, seconds: float) -> float:
    return HOST_GPU_FACTOR * gpu_energy_j + HOST_FIXED_W * seconds


@dataclass
class RunResult:
    policy: str
    tokens: float = 0.0
    energy_j: float = 0.0
    cost_usd: float = 0.0
    slo_windows: int = 0
    slo_violation_windows: int = 0
    seconds_power_above_budget: float = 0.0
    seconds_limits_above_budget: float = 0.0
    seconds_above_budget: float = 0.0
    seconds_instant_above_budget: float = 0.0
    virtual_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU seconds for the run
    aborted: bool = False  # a sweep candidate stopped once it could no longer be feasible
    stopped: bool = False  # stopped from outside: its result is not wanted (not reported)
    # what first made the run infeasible, "slo" (more violating windows than 0.99 allows) or
    # "budget" (a second above it), whether or not the run went on; None while neither has
    infeasible_by: str | None = None
    low_phase_ticks: int = 0
    low_phase_bound_ticks: int = 0
    batch_reversals: int = 0
    modes: dict[str, int] = field(default_factory=dict)
    timeline: dict[str, list[float]] = field(default_factory=dict)

    @property
    def energy_host_j(self) -> float:
        return host_energy_j(self.energy_j, self.virtual_s)

    def summary(self) -> dict[str, Any]:
        tpj = self.tokens / self.energy_j if self.energy_j > 0 else 0.0
        host_j = self.energy_host_j
        out: dict[str, Any] = {
            "tokens_per_joule": tpj,
            "tokens_per_joule_host": self.tokens / host_j if host_j > 0 else 0.0,
            "slo_attainment": 1.0 - self.slo_violation_windows / max(self.slo_windows, 1),
            "slo_violation_windows": self.slo_violation_windows,
            "slo_windows": self.slo_windows,
            "seconds_above_budget": self.seconds_above_budget,
            "seconds_power_above_budget": self.seconds_power_above_budget,
            "seconds_limits_above_budget": self.seconds_limits_above_budget,
            "seconds_instant_above_budget": self.seconds_instant_above_budget,
            "tokens": self.tokens,
            "energy_j": self.energy_j,
            "energy_host_j": host_j,
            "mean_gpu_power_w": self.energy_j / self.virtual_s / N_GPUS if self.virtual_s else 0.0,
            "speed_x_real_time": self.virtual_s / self.wall_s if self.wall_s > 0 else None,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "aborted": self.aborted,
            "budget_bound_share_low_phases": (
                self.low_phase_bound_ticks / self.low_phase_ticks if self.low_phase_ticks else None
            ),
            "batch_limit_reversals": self.batch_reversals,
            "modes": self.modes,
        }
        if self.cost_usd > 0 and self.tokens > 0:
            out["cost_usd_per_million_tokens"] = self.cost_usd / self.tokens * 1e6
        return out


def _noisy(g: GpuObservation, rng: random.Random) -> GpuObservation:
    avg = None if g.power_w is None else max(0.0, g.power_w + rng.gauss(0.0, NOISE_AVG_W))
    inst = g.power_instant_w
    if inst is not None:
        inst = max(0.0, inst + rng.gauss(0.0, NOISE_INSTANT_W))
    return GpuObservation(
        index=g.index,
        name=g.name,
        uuid=g.uuid,
        power_w=avg,
        power_instant_w=inst,
        energy_j=g.energy_j,
        power_limit_w=g.power_limit_w,
        enforced_limit_w=g.enforced_limit_w,
        min_limit_w=g.min_limit_w,
        max_limit_w=g.max_limit_w,
        default_limit_w=g.default_limit_w,
        sm_clock_mhz=g.sm_clock_mhz,
    )


class _Sensor:
    """The daemon's sensing, on the twin: one signal window per server fed with what the
    parser reads from its /metrics page, and noisy NVML readings."""

    def __init__(self, host: Any, setup: ModelSetup, seed: int, blind: bool) -> None:
        self.host = host
        self.setup = setup
        self.blind = blind
        self.rng = random.Random(seed * 31 + 7)
        self.windows: list[deque[Scrape]] = [deque() for _ in host.servers]

    def signals(self, server: int, now_s: float) -> ServerSignals:
        """The daemon's window (palsd.sense.signals, SIGNAL_WINDOW_S) over this tick's scrape.

        SignalWindow sums the increases between consecutive scrapes; on the twin, whose
        counters never reset, that sum equals the increase from the window's oldest scrape to
        its newest, so palsd's own `derive` is given just those two (20x cheaper; a test
        asserts the signals are equal). The page's e2e latency histogram is left out: no
        controller reads its quantiles, and it was a third of the histogram work."""
        w = self.windows[server]
        w.append(Scrape(now_s, self.host.scrape(server, e2e=False)))
        # SignalWindow.push keeps the scrapes inside the window, or, when none is, the newest
        # one before it.
        while len(w) > 2 and w[0].at_s < now_s - SIGNAL_WINDOW_S:
            w.popleft()
        return derive((w[0], w[-1]) if len(w) > 1 else (w[0],)).server

    def observe(self, budget: BudgetInForce, now_s: float, price: float | None) -> Observation:
        host = self.host
        servers = []
        for srv in host.servers:
            state = host.batch_state(srv.index)
            signals = None
            if not self.blind:
                signals = self.signals(srv.index, now_s)
            servers.append(
                ServerObservation(
                    name=srv.name,
                    url=f"twin://{srv.name}",
                    gpu_indices=tuple(srv.gpu_indices),
                    slo=self.setup.slo,
                    signals=signals,
                    batch_limit=int(state["limit"]),
                    max_num_seqs=int(state["max_num_seqs"]),
                )
            )
        gpus = host.gpu_readings()
        if not self.blind:
            gpus = [_noisy(g, self.rng) for g in gpus]
        return Observation(
            now_s=now_s,
            gpus=tuple(gpus),
            servers=tuple(servers),
            budget=budget,
            price_per_mwh=price,
        )


def _window_met(host: Any, setup: ModelSetup, index: int) -> bool:
    sig = host.server_signals(index, SLO_WINDOW_S, e2e=False)
    if not headroom(setup.slo, sig).meets():
        return False
    # Requests stuck in the queue leave no TTFT sample yet; a window in which requests waited
    # and none got its first token is a violation, not an empty window.
    no_first_token = quantile_of(sig.ttft_s, setup.slo.ttft_quantile) is None
    return not (sig.waiting >= 1 and no_first_token and sig.generation_tokens_per_s <= 0)


def _in_low_phase(scenario: Scenario, frac: float) -> bool:
    return any(a <= frac < b for a, b in scenario.low_phases)


def run_policy(
    policy: str,
    scenario_name: str,
    hours: float,
    seed: int,
    model: str,
    gpu: str = "h100",
    abort_when_infeasible: bool = False,
    scenario: Scenario | None = None,
    timeline_every_s: float = TIMELINE_EVERY_S,
    stop: Callable[[], bool] | None = None,
) -> RunResult:
    """One policy through one scenario. With abort_when_infeasible (the best_fixed sweep) the
    run stops as soon as it has gone above the budget or missed more SLO windows than an
    attainment of 0.99 allows: it can no longer be the winner, whatever the rest would show.
    `stop`, asked once per SLO window, ends the run early with `stopped` set when its result
    is no longer wanted (a sweep run started speculatively below a cap that then missed)."""
    setup = MODELS[model]
    scenario = scenario or build_scenario(scenario_name, seed)
    duration_s = hours * 3600.0
    host = build_host(
        setup, scenario, seed, gpu, duration_s, metrics_page=False, keep_records=False
    )
    ctrl = make_policy(policy)
    blind = is_blind(ctrl)
    sensor = _Sensor(host, setup, seed, blind)
    res = RunResult(policy=policy)
    tl: dict[str, list[float]] = {
        k: []
        for k in (
            "t_s",
            "budget_w",
            "power_w",
            "limits_w",
            "itl_ratio",
            "ttft_ratio",
            "batch_mean",
            "requests_per_s",
            "cap_mean_w",
            "waiting",
        )
    }
    last_change_s = 0.0
    last_budget: float | None = None
    names = [s.index for s in host.servers]
    index_of = {s.name: s.index for s in host.servers}
    tokens0 = sum(host.tokens_generated_total(n) for n in names)
    energy0 = host.energy_j_total()
    started = time.perf_counter()
    cpu0 = time.process_time()
    steps = round(duration_s / SUB_STEP_S)
    ticks_per_control = round(CONTROL_PERIOD_S / SUB_STEP_S)
    ticks_per_window = round(SLO_WINDOW_S / SUB_STEP_S)
    ticks_per_timeline = max(1, round(timeline_every_s / SUB_STEP_S))
    allowed_violations = int((1.0 - TARGET_ATTAINMENT) * (steps // ticks_per_window) + 1e-9)
    energy_prev = energy0
    last_dir: dict[int, int] = {}
    last_batch = {n: host.batch_state(n)["limit"] for n in names}
    k = 0
    for k in range(steps):
        now_s = k * SUB_STEP_S
        watts = scenario.budget_w(gpu, now_s, duration_s)
        price = (
            None if scenario.price_per_mwh is None else scenario.price_per_mwh.at(now_s, duration_s)
        )
        changed = watts != last_budget
        if changed and k > 0:
            last_change_s = now_s
        last_budget = watts
        # Fixed policies decide only when the budget changes (their decision depends on
        # nothing else); feedback policies every control period.
        if (k % ticks_per_control == 0 and not (blind and k > 0)) or changed:
            budget = BudgetInForce(watts, BudgetSource.FACILITY if watts else BudgetSource.NONE)
            obs = sensor.observe(budget, now_s, price)
            decision = ctrl.decide(obs)
            res.modes[decision.mode] = res.modes.get(decision.mode, 0) + 1
            if not blind and _in_low_phase(scenario, now_s / duration_s):
                res.low_phase_ticks += 1
                if decision.mode in ("budget-bound", "infeasible"):
                    res.low_phase_bound_ticks += 1
            current = {g.index: g.power_limit_w for g in obs.gpus}  # limits are not noised
            for index, limit_w in order_writes(current, decision.power_limits_w):
                host.set_power_limit_w(index, limit_w)
            for srv in obs.servers:
                want = decision.batch_limits.get(srv.name)
                n = index_of[srv.name]
                if want is not None and want != srv.batch_limit:
                    host.set_batch_limit(n, int(want))
                    step = 1 if want > last_batch[n] else -1
                    if last_dir.get(n, step) != step:
                        res.batch_reversals += 1
                    last_dir[n] = step
                    last_batch[n] = int(want)
        host.step(SUB_STEP_S)
        # Power against the budget is the NVML 1 s average: what the GPUs' own power cap
        # enforces and what a facility meter integrates. 100 ms instant spikes (prefill bursts
        # overshoot a cap; a real H100 read 121% of its limit while its average held) are
        # counted on their own, in seconds_instant_above_budget.
        power_w, instant_w, limits_w = host.power_totals_w()
        energy_now = host.energy_j_total()
        if price is not None:
            res.cost_usd += (energy_now - energy_prev) / 3.6e9 * price
        energy_prev = energy_now
        # The first second of the run counts as a budget arrival too (limits start at default).
        if watts is not None and now_s + SUB_STEP_S - last_change_s > SETTLE_S + 1e-9:
            over_p = power_w > watts
            over_l = limits_w > watts + 1e-6
            res.seconds_power_above_budget += SUB_STEP_S if over_p else 0.0
            res.seconds_limits_above_budget += SUB_STEP_S if over_l else 0.0
            res.seconds_above_budget += SUB_STEP_S if (over_p or over_l) else 0.0
            res.seconds_instant_above_budget += SUB_STEP_S if instant_w > watts else 0.0
        if (k + 1) % ticks_per_window == 0:
            res.slo_windows += 1
            if not all(_window_met(host, setup, n) for n in names):
                res.slo_violation_windows += 1
            if stop is not None and stop():
                res.stopped = res.aborted = True
                break
        if (k + 1) % ticks_per_timeline == 0:
            _record(
                tl,
                host,
                setup,
                names,
                now_s + SUB_STEP_S,
                watts,
                power_w,
                limits_w,
                timeline_every_s,
            )
        if res.infeasible_by is None and (
            res.seconds_above_budget > 0 or res.slo_violation_windows > allowed_violations
        ):
            res.infeasible_by = "slo" if res.seconds_above_budget == 0 else "budget"
            if abort_when_infeasible:
                res.aborted = True
                break
    res.wall_s = time.perf_counter() - started
    res.cpu_s = time.process_time() - cpu0
    res.virtual_s = (k + 1) * SUB_STEP_S
    res.tokens = sum(host.tokens_generated_total(n) for n in names) - tokens0
    res.energy_j = host.energy_j_total() - energy0
    res.timeline = tl
    return res


def fixed_pair_of(
    policy: str, scenario: Scenario, seed: int, model: str, gpu: str, duration_s: float
) -> tuple[float, int] | None:
    """The (cap W, batch limit) pair whose fixed policy decides exactly what `policy` decides
    under every budget of this run, or None (a feedback policy, or one whose decision moves
    with the budget). Such a policy's run is that pair's run: the same writes at the same
    ticks on the same arrivals (both are blind: they decide at the start and at each budget
    change), so the sweep takes it instead of running the pair again."""
    ctrl = make_policy(policy)
    if not is_blind(ctrl):
        return None
    setup = MODELS[model]
    host = build_host(
        setup, scenario, seed, gpu, duration_s, metrics_page=False, keep_records=False
    )
    sensor = _Sensor(host, setup, seed, True)
    decided = []
    for t_s in [0.0, *(s * duration_s for s, _ in scenario.budget.steps)]:
        watts = scenario.budget_w(gpu, t_s, duration_s)
        budget = BudgetInForce(watts, BudgetSource.FACILITY if watts else BudgetSource.NONE)
        obs = sensor.observe(budget, t_s, None)
        decided.append((obs, ctrl.decide(obs)))
    first = decided[0][1]
    caps = set(first.power_limits_w.values())
    batches = set(first.batch_limits.values())
    if len(caps) != 1 or len(batches) != 1:
        return None
    pair = (float(caps.pop()), int(batches.pop()))
    fixed = make_policy(fixed_name(*pair))
    for obs, d in decided:
        f = fixed.decide(obs)
        if (f.power_limits_w, f.batch_limits) != (d.power_limits_w, d.batch_limits):
            return None
    return pair


def _record(
    tl: dict[str, list[float]],
    host: Any,
    setup: ModelSetup,
    names: list[int],
    t_s: float,
    budget_w: float | None,
    power_w: float,
    limits_w: float,
    every_s: float = TIMELINE_EVERY_S,
) -> None:
    itl, ttft, batch, rps, waiting = 0.0, 0.0, 0.0, 0.0, 0.0
    for n in names:
        sig = host.server_signals(n, max(every_s, TIMELINE_EVERY_S), e2e=False)
        waiting += sig.waiting
        rps += sig.requests_per_s
        i = quantile_of(sig.itl_s, setup.slo.itl_quantile)
        f = quantile_of(sig.ttft_s, setup.slo.ttft_quantile)
        if i is not None and setup.slo.itl_s:
            itl = max(itl, i / setup.slo.itl_s)
        if f is not None and setup.slo.ttft_s:
            ttft = max(ttft, f / setup.slo.ttft_s)
        batch += host.batch_state(n)["limit"] / len(names)
    tl["t_s"].append(t_s)
    tl["budget_w"].append(float("nan") if budget_w is None else budget_w)
    tl["power_w"].append(power_w)
    tl["limits_w"].append(limits_w)
    tl["itl_ratio"].append(itl)
    tl["ttft_ratio"].append(ttft)
    tl["batch_mean"].append(batch)
    tl["requests_per_s"].append(rps)
    tl["cap_mean_w"].append(limits_w / len(host.gpu_readings()))
    tl["waiting"].append(waiting)
