"""The scenarios of `palsd simulate`: host shape, default SLOs, workload, budget and price traces.

Traces are piecewise constant, given as (start fraction of the run, value) so that a short run
(--hours 0.05) walks through the same steps as an hour. Every policy gets the same scenario, the
same seed and therefore the same arrivals.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

from palsd.core.types import Slo
from palsd.sim.engine import TwinHost
from palsd.sim.workload import ArrivalStream, BurstyWorkload, PoissonWorkload

H100_TDP_W = 700.0
N_GPUS = 8


@dataclass(frozen=True)
class ModelSetup:
    """How the 8-GPU host serves one model, and the SLO an operator would hold it to."""

    model: str  # the twin's preset name
    tp: int
    slo: Slo
    base_rate_per_s: float  # requests/s of the busiest server (about 60% of its capacity)
    max_num_seqs: int = 256


# Realistic interactive-chat SLOs: TTFT p90 within a couple of seconds, ITL p90 at reading
# speed with a margin (100 ms = 10 tokens/s for the large model; 50 ms for the small one).
MODELS: dict[str, ModelSetup] = {
    "mixtral": ModelSetup(
        model="mixtral-8x7b",
        tp=2,
        slo=Slo(ttft_s=2.0, ttft_quantile=0.9, itl_s=0.10, itl_quantile=0.9),
        base_rate_per_s=4.0,
    ),
    "qwen-moe": ModelSetup(
        model="qwen-moe",
        tp=1,
        slo=Slo(ttft_s=1.0, ttft_quantile=0.9, itl_s=0.05, itl_quantile=0.9),
        base_rate_per_s=6.0,
    ),
}

# Servers are not equally busy: the share of the base rate each one gets, and whether its
# arrivals are Poisson or bursty (on/off modulated). Cycled over the servers.
LOAD_SHARES = (1.0, 0.8, 0.6, 0.4)
ARRIVALS = ("poisson", "bursty", "poisson", "bursty")


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
    price_per_mwh: Trace | None = None


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


def build_scenario(name: str, seed: int) -> Scenario:
    full = N_GPUS * H100_TDP_W
    if name == "efficiency":
        return Scenario(name, "budget = 8 x TDP, never binds", _flat(full))
    if name == "strict":
        return Scenario(name, "budget = 43% of TDP per GPU for the whole run", _flat(0.43 * full))
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
            name, "budget steps 100/60/43/35/60/100% of TDP, 10 min each per hour", Trace(steps)
        )
    if name == "price":
        prices = price_trace(seed)
        return Scenario(
            name,
            "real-time price in 5 min intervals; the facility budget follows the price "
            "(<$100: 100%, <$300: 60%, else 43% of TDP)",
            budget_for_price(prices),
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


def server_workloads(setup: ModelSetup, n_servers: int) -> PerServerWorkload:
    out: list[Any] = []
    for k in range(n_servers):
        rate = setup.base_rate_per_s * LOAD_SHARES[k % len(LOAD_SHARES)]
        if ARRIVALS[k % len(ARRIVALS)] == "poisson":
            out.append(PoissonWorkload(rate))
        else:
            # Same mean rate as the Poisson servers' share: bursts at 2.5x for ~10 s, calm
            # spells at 0.625x for ~40 s.
            out.append(
                BurstyWorkload(
                    low_rate_per_s=0.625 * rate,
                    high_rate_per_s=2.5 * rate,
                    low_mean_s=40.0,
                    high_mean_s=10.0,
                )
            )
    return PerServerWorkload(tuple(out))


def build_host(setup: ModelSetup, seed: int) -> TwinHost:
    n_servers = N_GPUS // setup.tp
    return TwinHost(
        gpu="h100",
        model=setup.model,
        n_gpus=N_GPUS,
        workload=server_workloads(setup, n_servers),
        seed=seed,
        max_num_seqs=setup.max_num_seqs,
        initial_batch_limit=64,
        tp=setup.tp,
    )
