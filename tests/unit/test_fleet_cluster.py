"""The cluster scenario (palsd/sim/cluster.py), short: under the fleet policy the hosts' budgets
never sum above the group budget, the group's 1 s power never exceeds it, and power follows the
load from one host to another. The full hour is `palsd simulate --scenario cluster`."""

from __future__ import annotations

from palsd.sim.cluster import run_cluster


def test_fleet_moves_power_with_the_load_and_stays_under_the_group_budget():
    res = run_cluster("fleet", hosts=3, hours=0.03, seed=1, model="mixtral")
    assert res.max_budget_sum_w <= res.group_budget_w + 1e-6
    assert res.seconds_above_budget == 0.0
    share = res.group_budget_w / 3
    first, last = res.budgets_w["host0"], res.budgets_w["host2"]
    n = len(first)
    # host0 is busy in the first third, host2 in the last: each gets more than its share then.
    assert max(first[: n // 3]) > share + 500
    assert max(last[2 * n // 3 :]) > share + 500
