"""The timelines of `make run`'s demo, so that within two minutes it shows the controller at work:
load swells and bursts (the sim host's `--workload demo`), and a budget override cuts the host
budget for 30 s of every 60 s (the demo sets it through palsd's local API, as an operator or a
facility would), so caps move, the budget binds, batch limits change and the status says why.
"""

from __future__ import annotations

import math

from palsd.sim.workload import PoissonWorkload, RateFn, Workload

DEMO_PERIOD_S = 90.0  # one swell of the load
DEMO_RATE_PER_S = 10.0  # mean requests/s per server (Mixtral TP=2 serves ~33 at vLLM's defaults)
BUDGET_CYCLE_S = 60.0
BUDGET_CUT_FROM_S = 25.0  # within each cycle, the cut is in force from here ...
BUDGET_CUT_TO_S = 55.0  # ... to here
BUDGET_CUT_FRAC = 0.4  # of the GPUs' summed maximum limits
DEFAULT_BUDGET_FRAC = 0.7


def demo_rate(base_per_s: float, period_s: float = DEMO_PERIOD_S) -> RateFn:
    """A swell from 30% to 170% of base over each period, with a 1.6x burst near its top."""

    def rate(t_s: float) -> float:
        phase = (t_s % period_s) / period_s
        swell = 1.0 + 0.7 * math.sin(2 * math.pi * phase)
        burst = 1.6 if 0.18 <= phase < 0.28 else 1.0
        return base_per_s * swell * burst

    return rate


def demo_workload(base_per_s: float = DEMO_RATE_PER_S) -> Workload:
    return PoissonWorkload(demo_rate(base_per_s), rate_max_per_s=base_per_s * 1.7 * 1.6 * 1.1)


def override_at(elapsed_s: float, max_sum_w: float) -> float | None:
    """The budget override the demo holds at `elapsed_s` (None: no override)."""
    phase = elapsed_s % BUDGET_CYCLE_S
    if BUDGET_CUT_FROM_S <= phase < BUDGET_CUT_TO_S:
        return round(BUDGET_CUT_FRAC * max_sum_w)
    return None
