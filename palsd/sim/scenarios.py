"""The scenarios of `palsd simulate`: host shape, default SLOs, workload, budget and price traces.

Traces are piecewise constant, given as (start fraction of the run, value) so that a short run
(--hours 0.05) walks through the same steps as an hour. Every policy gets the same scenario, the
same seed and therefore the same arrivals.

Loads are relative to the twin's own measured capacity, not fixed rates: at set-up the twin
serves a deep backlog on one server at PALS's static operating point (batch 64, each GPU at
min(default, lowest budget of the scenario / GPUs)) and the finished requests/s is the capacity.
Each scenario names a utilisation of that capacity for its busiest server, so a change of model,
GPU or twin calibration keeps every scenario at the stress it is meant to test.
"""

from __future__ import annotations

import bisect
import functools
import random
from dataclasses import dataclass
from typing import Any

from palsd.core.types import Slo
from palsd.sim.engine import TwinHost
from palsd.sim.workload import (
    ArrivalStream,
    BacklogWorkload,
    BurstyWorkload,
    PoissonWorkload,
)

H100_TDP_W = 700.0
H100_MIN_W = 200.0
N_GPUS = 8


@dataclass(frozen=True)
class ModelSetup:
    """How the 8-GPU host serves one model, and the SLO an operator would hold it to."""

    model: str  # the twin's preset name
    tp: int
    slo: Slo
    max_num_seqs: int = 256


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

# Servers are not equally busy: the share of the base rate each one gets, and whether its
# arrivals are Poisson or bursty (on/off modulated). Cycled over the servers.
LOAD_SHARES = (1.0, 0.9, 0.8, 0.7)
ARRIVALS = ("poisson", "bursty", "poisson", "bursty")
# Bursty servers: bursts at 1.5x their mean for ~10 s, calm spells at 0.875x for ~40 s.
BURST_HIGH, BURST_LOW, BURST_HIGH_S, BURST_LOW_S = 1.5, 0.875, 10.0, 40.0
STATIC_BATCH = 64


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
    name: str
    description: str
    budget: Trace
    utilisation: float  # busiest server's mean load / static's measured capacity
    price_per_mwh: Trace | None = None

    def static_cap_w(self) -> float:
        """Static's per-GPU limit under the scenario's lowest budget (the capacity reference)."""
        budgets = [w for _, w in self.budget.steps if w is not None]
        lowest = min(budgets) if budgets else N_GPUS * H100_TDP_W
        return max(H100_MIN_W, min(H100_TDP_W, lowest / N_GPUS))


def _flat(watts: float | None) -> Trace:
    return Trace(((0.0, watts),))


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
    full = N_GPUS * H100_TDP_W
    out = []
    for start, price in prices.steps:
        p = price or 0.0
        watts = full if p < 100 else (0.6 * full if p < 300 else 0.43 * full)
        out.append((start, watts))
    return Trace(tuple(out))


# Busiest server's load as a share of static's capacity, per scenario (why: docs/controller.md).
UTILISATION = {"efficiency": 0.8, "strict": 0.85, "demand_response": 0.85, "price": 0.8}


def build_scenario(name: str, seed: int) -> Scenario:
    full = N_GPUS * H100_TDP_W
    u = UTILISATION.get(name, 0.8)
    if name == "efficiency":
        return Scenario(name, "budget = 8 x TDP, never binds", _flat(full), u)
    if name == "strict":
        return Scenario(
            name, "budget = 43% of TDP per GPU for the whole run", _flat(0.43 * full), u
        )
    if name == "demand_response":
        steps = (
            (0.0, full),
            (1 / 6, 0.6 * full),
            (2 / 6, 0.43 * full),
            (3 / 6, 0.35 * full),
            (4 / 6, 0.6 * full),
            (5 / 6, full),
        )
        return Scenario(
            name, "budget steps 100/60/43/35/60/100% of TDP, 10 min each per hour", Trace(steps), u
        )
    if name == "price":
        prices = price_trace(seed)
        return Scenario(
            name,
            "real-time price in 5 min intervals; the facility budget follows the price "
            "(<$100: 100%, <$300: 60%, else 43% of TDP)",
            budget_for_price(prices),
            u,
            prices,
        )
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")


SCENARIOS = ("efficiency", "strict", "demand_response", "price")


@dataclass(frozen=True)
class PerServerWorkload:
    """One workload recipe per server (cycled): the twin asks for server k's stream by index."""

    workloads: tuple[Any, ...]

    def stream(self, server: int, seed: int) -> ArrivalStream:
        return self.workloads[server % len(self.workloads)].stream(server, seed)


@functools.lru_cache(maxsize=16)
def static_capacity_per_s(model: str, tp: int, cap_w: float, seed: int = 0) -> float:
    """Requests/s one server finishes when saturated at PALS's static point (batch 64, every
    GPU at cap_w), measured on the twin itself: 30 s warm-up, then 120 s counted."""
    host = TwinHost(
        gpu="h100",
        model=model,
        n_gpus=tp,
        workload=BacklogWorkload(),
        seed=seed,
        max_num_seqs=256,
        initial_batch_limit=STATIC_BATCH,
        tp=tp,
    )
    for i in range(tp):
        host.set_power_limit_w(i, cap_w)
    host.step(30.0)
    done0 = len(host.request_records(0))
    host.step(120.0)
    return (len(host.request_records(0)) - done0) / 120.0


def server_rates_per_s(setup: ModelSetup, scenario: Scenario, n_servers: int) -> list[float]:
    capacity = static_capacity_per_s(setup.model, setup.tp, scenario.static_cap_w())
    busiest = scenario.utilisation * capacity
    return [busiest * LOAD_SHARES[k % len(LOAD_SHARES)] for k in range(n_servers)]


def server_workloads(setup: ModelSetup, scenario: Scenario, n_servers: int) -> PerServerWorkload:
    out: list[Any] = []
    for k, rate in enumerate(server_rates_per_s(setup, scenario, n_servers)):
        if ARRIVALS[k % len(ARRIVALS)] == "poisson":
            out.append(PoissonWorkload(rate))
        else:
            out.append(
                BurstyWorkload(
                    low_rate_per_s=BURST_LOW * rate,
                    high_rate_per_s=BURST_HIGH * rate,
                    low_mean_s=BURST_LOW_S,
                    high_mean_s=BURST_HIGH_S,
                )
            )
    return PerServerWorkload(tuple(out))


def build_host(setup: ModelSetup, scenario: Scenario, seed: int) -> TwinHost:
    n_servers = N_GPUS // setup.tp
    return TwinHost(
        gpu="h100",
        model=setup.model,
        n_gpus=N_GPUS,
        workload=server_workloads(setup, scenario, n_servers),
        seed=seed,
        max_num_seqs=setup.max_num_seqs,
        initial_batch_limit=STATIC_BATCH,
        tp=setup.tp,
    )
