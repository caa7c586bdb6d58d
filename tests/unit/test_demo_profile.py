"""`make run`'s demo timelines: within two minutes the budget is cut and restored, and the load
swells and bursts (so caps move, the budget binds and batch limits change)."""

from __future__ import annotations

import itertools

from palsd.sim.demo_profile import DEMO_PERIOD_S, demo_rate, override_at


def test_the_budget_is_cut_and_restored_within_two_minutes() -> None:
    states = [override_at(t, 2800.0) for t in range(120)]
    assert None in states[:25]
    assert any(s is not None and s < 0.5 * 2800.0 for s in states)
    changes = sum(1 for a, b in itertools.pairwise(states) if a != b)
    assert changes >= 3  # cut, restored, cut again


def test_the_load_swells_and_bursts_within_two_minutes() -> None:
    rate = demo_rate(10.0)
    seen = [rate(t / 2) for t in range(240)]
    assert DEMO_PERIOD_S <= 120.0
    assert max(seen) > 2.0 * 10.0 and min(seen) < 0.5 * 10.0
