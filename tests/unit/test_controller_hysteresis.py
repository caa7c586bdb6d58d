"""Issue 13 item 4: at a fixed infeasible budget the batch limit settles instead of cycling.

The controller is driven in virtual time against a toy plant: one server on GPUs at their floor
whose averaged power grows with the number of requests it runs (its batch limit, since requests
always wait). Pure values, no twin, no mocks.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from palsd.core.controller import JointController
from palsd.core.types import Observation
from tests.unit.test_controller_fixtures import gpu, obs, server, signals

PERIOD_S = 0.5


def reversals_per_window(limits: list[tuple[float, int]], window_s: float) -> int:
    """The most direction changes of the batch limit inside any window of window_s."""
    turns: list[float] = []
    last_dir = 0
    for (_, a), (t, b) in itertools.pairwise(limits):
        if b == a:
            continue
        d = 1 if b > a else -1
        if last_dir and d != last_dir:
            turns.append(t)
        last_dir = d
    return max((sum(1 for u in turns if t <= u < t + window_s) for t in turns), default=0)


def run(
    n_gpus: int, budget_w: float, idle_w: float, per_request_w: float, minutes: float
) -> list[tuple[float, int]]:
    ctrl = JointController()
    batch = 4
    seen: list[tuple[float, int]] = []
    t = 0.0
    while t < minutes * 60.0:
        running = batch
        per_gpu_w = idle_w + per_request_w * running
        gpus = [
            dataclasses.replace(gpu(i, power_w=per_gpu_w, limit_w=200.0), power_instant_w=None)
            for i in range(n_gpus)
        ]
        srv = server(
            "s0",
            tuple(range(n_gpus)),
            signals(itl_s=0.05, ttft_s=0.5, running=running, waiting=10),
            batch_limit=batch,
        )
        o: Observation = obs(t, gpus, [srv], budget_w)
        decision = ctrl.decide(o)
        batch = decision.batch_limits["s0"]
        seen.append((t, batch))
        t += PERIOD_S
    return seen


@pytest.mark.parametrize(
    ("case", "n_gpus", "budget_w", "idle_w", "per_request_w"),
    [
        # One GPU at its 200 W floor, budget 200 W (no room for a guard band): batch 1 draws
        # 185 W (room to grow), batch 2 draws 210 W (above the budget): the 1 <-> 2.
        ("budget at the floor, batch 2 just too much", 1, 200.0, 160.0, 25.0),
        ("budget at the floor, batch 1 close to it", 1, 200.0, 175.0, 20.0),
        # Below the sum of minimum limits: infeasible outright.
        ("budget below the minimum limits", 2, 350.0, 150.0, 15.0),
    ],
)
def test_batch_limit_reverses_at_most_once_a_minute_at_a_fixed_infeasible_budget(
    case: str, n_gpus: int, budget_w: float, idle_w: float, per_request_w: float
) -> None:
    seen = run(n_gpus, budget_w, idle_w, per_request_w, minutes=20)
    assert reversals_per_window(seen, 60.0) <= 1, case
    # and it ends low: the budget is respected by less work, not ignored
    assert seen[-1][1] <= 2


def test_the_reversal_counter_counts_direction_changes() -> None:
    series = [(0.0, 4), (1.0, 3), (2.0, 4), (3.0, 3), (100.0, 4)]
    assert reversals_per_window(series, 60.0) == 2  # the third is 97 s later
    assert reversals_per_window(series, 120.0) == 3
    assert reversals_per_window([(0.0, 1), (1.0, 2), (2.0, 3)], 60.0) == 0
