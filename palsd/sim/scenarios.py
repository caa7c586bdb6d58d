"""The scenarios of `palsd simulate`: host shape, default SLOs, workload, budget and price traces.

Traces are piecewise constant, given as (start fraction of the run, value) so that a short run
(--hours 0.05) walks through the same steps as an hour. Every policy gets the same scenario, the
same seed and therefore the same arrivals.

Loads are relative to the twin's own measured capacity, not fixed rates: at set-up the twin
serves a deep backlog on one server at vLLM's defaults (the GPU's default power limit, batch
limit = max_num_seqs = 256) and the finished requests/s is the capacity (one figure per request
mix). Each scenario names a utilisation of that capacity for its busiest server, so a change of
model, GPU or twin calibration keeps every scenario at the stress it is meant to test.

Budgets are relative to the preset's NVML limit range: a fraction f puts the host budget at
sum(min limits) + f * (sum(max limits) - sum(min limits)), so f = 0 is every GPU at its floor and
f = 1 is every GPU at its maximum, on any GPU.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from palsd.core.types import Slo
from palsd.sim.engine import TwinHost
from palsd.sim.gpu_model import GPU_PRESETS
from palsd.sim.models import MODEL_PRESETS
from palsd.sim.workload import (
    DEFAULT_OUTPUT,
    DEFAULT_PROMPT,
    LONG_OUTPUT,
    LONG_PROMPT,
    ArrivalStream,
    BacklogWorkload,
    BurstyWorkload,
    MixedWorkload,
    PoissonWorkload,
    RecordedWorkload,
)

N_GPUS = 8
VLLM_DEFAULT_BATCH = 256  # vLLM's default max_num_seqs (the twin's max_num_seqs)


@dataclass(frozen=True)
class ModelSetup:
    """How the 8-GPU host serves one model, and the SLO an operator would hold it to."""

    model: str  # the twin's preset name
    tp: int
    slo: Slo
    max_num_seqs: int = VLLM_DEFAULT_BATCH


# Realistic interactive-chat SLOs: TTFT p90 within a couple of seconds, ITL p90 at reading
# speed with a margin (100 ms = 10 tokens/s for the large model; 50 ms for the small one).
MODELS: dict[str, ModelSetup] = {
    "mixtral": ModelSetup(
        model="mixtral-8x7b",
        tp=2,
        slo=Slo(ttft_s=2.0, ttft_quantile=0.9, itl_s=0.10, itl_quantile=0.9),
    ),
    "qwen-moe": ModelSetup(
        model="qwen-moe",
        tp=1,
        slo=Slo(ttft_s=1.0, ttft_quantile=0.9, itl_s=0.05, itl_quantile=0.9),
    ),
}
# Dense presets, where the twin has them: the small one held to the small MoE's SLO, the large
# one (TP=4) to Mixtral's.
_DENSE_SLOS = {
    "dense-8b": Slo(ttft_s=1.0, ttft_quantile=0.9, itl_s=0.05, itl_quantile=0.9),
    "dense-70b": Slo(ttft_s=2.0, ttft_quantile=0.9, itl_s=0.10, itl_quantile=0.9),
}
for _name, _slo in _DENSE_SLOS.items():
    if _name in MODEL_PRESETS:
        MODELS[_name] = ModelSetup(model=_name, tp=MODEL_PRESETS[_name].default_tp, slo=_slo)

# Servers are not equally busy: the share of the base rate each one gets, and whether its
# arrivals are Poisson or bursty (on/off modulated). Cycled over the servers.
LOAD_SHARES = (1.0, 0.9, 0.8, 0.7)
ARRIVALS = ("poisson", "bursty", "poisson", "bursty")
# Bursty servers: bursts at 1.5x their mean for ~10 s, calm spells at 0.875x for ~40 s.
BURST_HIGH, BURST_LOW, BURST_HIGH_S, BURST_LOW_S = 1.5, 0.875, 10.0, 40.0
# In the diurnal and mixed scenarios bursts ride on a varying load: 1.2x for ~10 s, 0.95x for
# ~40 s (mean 1.0), so the peak with its bursts reaches ~95% of capacity.
SOFT_BURST = (0.95, 1.2, 40.0, 10.0)


@dataclass(frozen=True)
class Trace:
    """A piecewise-constant signal: (start fraction of the run, value) in time order."""

    steps: tuple[tuple[float, float | None], ...]

    def at(self, t_s: float, duration_s: float) -> float | None:
        starts = [s for s, _ in self.steps]
        i = bisect.bisect_right(starts, t_s / duration_s) - 1
        return self.steps[max(i, 0)][1]

    def change_times_s(self, duration_s: float) -> list[float]:
        return [s * duration_s for s, _ in self.steps[1:]]


@dataclass(frozen=True)
class Scenario:
    """budget: fractions of the preset's limit range (see the module doc), None: no budget.
    load: a shape of the run (fraction of the run -> multiplier of `utilisation`), None: flat.
    long_share: the share of long-prompt, prefill-heavy requests over the run, None: all chat."""

    name: str
    description: str
    budget: Trace
    utilisation: float  # busiest server's mean load / capacity at vLLM's defaults
    price_per_mwh: Trace | None = None
    load: tuple[tuple[float, float], ...] | None = None  # (fraction, multiplier), interpolated
    long_share: Trace | None = None
    bursts: bool = True
    low_phases: tuple[tuple[float, float], ...] = field(default=())  # where the budget binds

    def budget_w(self, gpu: str, t_s: float, duration_s: float) -> float | None:
        frac = self.budget.at(t_s, duration_s)
        return None if frac is None else budget_from_fraction(gpu, frac)

    def load_at(self, frac: float) -> float:
        if self.load is None:
            return 1.0
        pts = self.load
        if frac <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if frac <= x1:
                return y0 + (y1 - y0) * (frac - x0) / max(x1 - x0, 1e-12)
        return pts[-1][1]


def budget_from_fraction(gpu: str, frac: float) -> float:
    spec = GPU_PRESETS[gpu]
    lo, hi = N_GPUS * spec.min_limit_w, N_GPUS * spec.max_limit_w
    return round(lo + frac * (hi - lo), 1)


def _flat(frac: float | None) -> Trace:
    return Trace(((0.0, frac),))


def price_trace(seed: int, intervals: int = 12) -> Trace:
    """A real-time price series in the shape of a 5-minute wholesale market over one hour:
    a base near $40/MWh with noise, an evening-ramp rise and a scarcity spike. Synthetic (no
    market data is fetched), seeded, the same for every policy."""
    rng = random.Random(seed * 7919 + 17)
    shape = [35, 38, 42, 55, 80, 140, 420, 260, 110, 70, 48, 40]
    steps = []
    for i in range(intervals):
        base = shape[i % len(shape)]
        steps.append((i / intervals, round(base * rng.uniform(0.85, 1.15), 2)))
    return Trace(tuple(steps))


def budget_for_price(prices: Trace) -> Trace:
    """The facility's price response: full power when cheap, less as the price climbs."""
    out = []
    for start, price in prices.steps:
        p = price or 0.0
        frac = 1.0 if p < 100 else (0.5 if p < 300 else 0.25)
        out.append((start, frac))
    return Trace(tuple(out))


# Busiest server's mean load as a share of the capacity at vLLM's defaults
# (why: docs/controller.md).
UTILISATION = {
    "efficiency": 0.6,
    "strict": 0.5,
    "demand_response": 0.5,
    "price": 0.5,
    "diurnal": 0.8,
    "mixed": 0.5,
}
# The budget scenarios must bind palsd itself: at half load palsd's own optimum on the H100
# twin is ~290-300 W per GPU, so a budget at f = 0.3 (350 W) never bound it. f = 0.1 (250 W per
# GPU) sits below it, and the twin still serves half load there (a saturated server at 250 W
# finishes ~18 requests/s against the busiest server's ~15: hard, not hopeless).
STRICT_FRAC = 0.1  # strict: every GPU at its floor plus 10% of its range (H100: 250 W, 36% TDP)
# Demand response: full power, then the low phases (the middle three steps, low_phases) at
# 10%, 5% and 10% of the range (H100: 250 / 225 / 250 W per GPU; 5% is below what the busiest
# server needs, so a queue builds there for every policy), a partial recovery at 50%, and
# full power. f = 0 (every GPU at its floor) is left out: it leaves no room for any guard band
# below the budget, so a prefill burst's overshoot of the minimum limits would count against
# it for every policy, which tests the twin's firmware, not a controller.
DR_FRACS = (1.0, 0.1, 0.05, 0.1, 0.5, 1.0)  # six equal steps


def build_scenario(name: str, seed: int) -> Scenario:
    u = UTILISATION.get(name, 0.6)
    if name == "efficiency":
        return Scenario(name, "no binding budget (every GPU may draw its maximum)", _flat(1.0), u)
    if name == "strict":
        return Scenario(
            name,
            f"budget = min limits + {STRICT_FRAC:.0%} of the limit range for the whole run",
            _flat(STRICT_FRAC),
            u,
            low_phases=((0.0, 1.0),),
        )
    if name == "demand_response":
        steps = tuple((i / 6, f) for i, f in enumerate(DR_FRACS))
        return Scenario(
            name,
            "budget steps through "
            + "/".join(f"{f:.0%}" for f in DR_FRACS)
            + " of the limit range above the minimums, 10 min each per hour",
            Trace(steps),
            u,
            low_phases=((1 / 6, 4 / 6),),
        )
    if name == "price":
        prices = price_trace(seed)
        return Scenario(
            name,
            "real-time price in 5 min intervals; the facility budget follows the price "
            "(<$100: 100%, <$300: 50%, else 25% of the limit range above the minimums)",
            budget_for_price(prices),
            u,
            prices,
        )
    if name == "diurnal":
        # A day compressed into the run: night at 10% of the peak, a morning ramp, a plateau
        # at 80% of capacity whose bursts (1.2x) reach ~95%, an evening fall.
        shape = ((0.0, 0.1), (0.15, 0.1), (0.4, 1.0), (0.6, 1.0), (0.85, 0.1), (1.0, 0.1))
        return Scenario(
            name,
            "load 10% -> 95% of capacity and back (a compressed day), bursts on half the "
            "servers; no binding budget",
            _flat(1.0),
            u,
            load=shape,
        )
    if name == "mixed":
        # Six phases alternating chat-like and long-prompt (prefill-heavy) traffic, each at
        # the same share of its own capacity.
        shares = (0.0, 0.9, 0.2, 1.0, 0.0, 0.7)
        return Scenario(
            name,
            "request mix shifts between chat-like (prompt 384 / output 192 tokens) and "
            "long-prompt (3000 / 96) traffic every 10 min; load at 50% of each mix's capacity; "
            "no binding budget",
            _flat(1.0),
            u,
            long_share=Trace(tuple((i / 6, s) for i, s in enumerate(shares))),
        )
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")


SCENARIOS = ("efficiency", "strict", "demand_response", "price", "diurnal", "mixed")


@dataclass(frozen=True)
class PerServerWorkload:
    """One workload recipe per server (cycled): the twin asks for server k's stream by index."""

    workloads: tuple[Any, ...]

    def stream(self, server: int, seed: int) -> ArrivalStream:
        return self.workloads[server % len(self.workloads)].stream(server, seed)


@functools.lru_cache(maxsize=32)
def capacity_per_s(
    gpu: str,
    model: str,
    tp: int,
    batch: int = VLLM_DEFAULT_BATCH,
    cap_w: float | None = None,
    long: bool = False,
    seed: int = 0,
) -> float:
    """Requests/s one server finishes when saturated at a fixed batch limit and power limit
    (default: vLLM's defaults, the GPU's default limit), measured on the twin itself: 30 s
    warm-up, then 120 s counted. `long`: the long-prompt mix instead of the chat mix."""
    prompt, output = (LONG_PROMPT, LONG_OUTPUT) if long else (DEFAULT_PROMPT, DEFAULT_OUTPUT)
    host = TwinHost(
        gpu=gpu,
        model=model,
        n_gpus=tp,
        workload=BacklogWorkload(prompt, output),
        seed=seed,
        max_num_seqs=VLLM_DEFAULT_BATCH,
        initial_batch_limit=batch,
        tp=tp,
        metrics_page=False,
    )
    if cap_w is not None:
        for i in range(tp):
            host.set_power_limit_w(i, cap_w)
    host.step(30.0)
    done0 = len(host.request_records(0))
    host.step(120.0)
    return (len(host.request_records(0)) - done0) / 120.0


def server_rates_per_s(
    setup: ModelSetup, scenario: Scenario, n_servers: int, gpu: str = "h100"
) -> list[float]:
    """Mean chat-mix request rate of each server (before the load shape)."""
    capacity = capacity_per_s(gpu, setup.model, setup.tp)
    busiest = scenario.utilisation * capacity
    return [busiest * LOAD_SHARES[k % len(LOAD_SHARES)] for k in range(n_servers)]


@dataclass(frozen=True)
class _Shape:
    """rate(t) = mean * load shape(t / duration) * (mix capacity factor at t)."""

    scenario: Scenario
    duration_s: float
    mean_per_s: float
    long_factor: float  # capacity(long mix) / capacity(chat mix)

    def __call__(self, t_s: float) -> float:
        frac = t_s / self.duration_s
        rate = self.mean_per_s * self.scenario.load_at(frac)
        if self.scenario.long_share is not None:
            share = self.scenario.long_share.at(t_s, self.duration_s) or 0.0
            # the same share of capacity whatever the mix: harmonic mean of the capacities
            rate /= (1.0 - share) + share / self.long_factor
        return rate


@dataclass(frozen=True)
class _LongShare:
    """The long-prompt share at a time of the run (a value, not a closure, so that two builds
    of one scenario give equal workloads: see build_host)."""

    trace: Trace | None
    duration_s: float

    def __call__(self, t_s: float) -> float:
        return 0.0 if self.trace is None else (self.trace.at(t_s, self.duration_s) or 0.0)


def long_share_fn(scenario: Scenario, duration_s: float) -> Any:
    return _LongShare(scenario.long_share, duration_s)


def server_workloads(
    setup: ModelSetup, scenario: Scenario, n_servers: int, gpu: str, duration_s: float
) -> PerServerWorkload:
    out: list[Any] = []
    long_factor = 1.0
    if scenario.long_share is not None:
        chat = capacity_per_s(gpu, setup.model, setup.tp)
        long_factor = capacity_per_s(gpu, setup.model, setup.tp, long=True) / chat
    peak = max(y for _, y in scenario.load) if scenario.load else 1.0
    for k, rate in enumerate(server_rates_per_s(setup, scenario, n_servers, gpu)):
        bursty = ARRIVALS[k % len(ARRIVALS)] == "bursty" and scenario.bursts
        if scenario.load is None and scenario.long_share is None:
            if bursty:
                out.append(
                    BurstyWorkload(
                        low_rate_per_s=BURST_LOW * rate,
                        high_rate_per_s=BURST_HIGH * rate,
                        low_mean_s=BURST_LOW_S,
                        high_mean_s=BURST_HIGH_S,
                    )
                )
            else:
                out.append(PoissonWorkload(rate))
            continue
        shape = _Shape(scenario, duration_s, rate, long_factor)
        bound = rate * peak / min(1.0, long_factor) * (SOFT_BURST[1] if bursty else 1.0) * 1.05
        out.append(
            MixedWorkload(
                rate_per_s=shape,
                rate_max_per_s=bound,
                long_share=long_share_fn(scenario, duration_s),
                bursts=SOFT_BURST if bursty else None,
            )
        )
    return PerServerWorkload(tuple(out))


@functools.lru_cache(maxsize=2)
def _recorded(workload: PerServerWorkload) -> RecordedWorkload:
    """One recording per workload recipe (equal recipes share it), the last two kept."""
    return RecordedWorkload(workload)


def build_host(
    setup: ModelSetup,
    scenario: Scenario,
    seed: int,
    gpu: str = "h100",
    duration_s: float = 3600.0,
    metrics_page: bool = True,
    keep_records: bool = True,
) -> TwinHost:
    """The scenario's 8-GPU host; `metrics_page` False when nothing will render /metrics
    (the runner reads scrapes: the page-only histograms would cost ~5% of a run),
    `keep_records` False when nothing reads the finished requests (the runner does not).

    The arrivals are drawn once per process for a scenario, seed and duration and replayed
    to every later host of it (RecordedWorkload): the runner builds one host per policy."""
    n_servers = N_GPUS // setup.tp
    return TwinHost(
        gpu=gpu,
        model=setup.model,
        n_gpus=N_GPUS,
        workload=_recorded(server_workloads(setup, scenario, n_servers, gpu, duration_s)),
        seed=seed,
        max_num_seqs=setup.max_num_seqs,
        initial_batch_limit=setup.max_num_seqs,
        tp=setup.tp,
        metrics_page=metrics_page,
        keep_records=keep_records,
    )


def sweep_caps_w(gpu: str, step_w: float = 50.0) -> list[float]:
    """best_fixed's caps: from the preset's minimum to its maximum in steps of at most step_w."""
    spec = GPU_PRESETS[gpu]
    n = max(1, math.ceil((spec.max_limit_w - spec.min_limit_w) / step_w))
    return [
        round(spec.min_limit_w + i * (spec.max_limit_w - spec.min_limit_w) / n, 1)
        for i in range(n + 1)
    ]
