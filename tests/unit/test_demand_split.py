"""The first controller: demand-weighted split of the budget, pure and table-driven."""

from __future__ import annotations

from palsd.core.demand_split import DemandSplitController, DemandSplitParams
from palsd.core.types import BudgetInForce, BudgetSource, Observation
from tests.unit.gpus import h100


def obs(gpus, budget_w):
    source = BudgetSource.NONE if budget_w is None else BudgetSource.DEFAULT
    return Observation(0.0, tuple(gpus), (), BudgetInForce(budget_w, source))


def test_no_budget_sets_default_limits():
    d = DemandSplitController().decide(obs([h100(0, limit_w=500)], None))
    assert d.power_limits_w == {0: 550.0}  # slew-limited towards the 700 W default
    assert d.mode == "unconstrained"


def test_pressing_gpu_gets_more_of_a_binding_budget():
    gpus = [h100(0, power_w=495, limit_w=500), h100(1, power_w=250, limit_w=500)]
    c = DemandSplitController(DemandSplitParams(max_raise_w_per_tick=None))
    d = c.decide(obs(gpus, 800))
    assert sum(d.power_limits_w.values()) <= 800
    assert d.power_limits_w[0] > d.power_limits_w[1]
    assert d.mode == "budget-bound"


def test_lower_budget_lowers_at_once_despite_slew_limit():
    gpus = [h100(i, power_w=600, limit_w=700) for i in range(4)]
    d = DemandSplitController().decide(obs(gpus, 1200))
    assert sum(d.power_limits_w.values()) <= 1200
    assert all(200 <= w <= 700 for w in d.power_limits_w.values())


def test_infeasible_budget_reported():
    d = DemandSplitController().decide(obs([h100(0), h100(1)], 300))
    assert d.infeasible and d.mode == "infeasible"
    assert d.power_limits_w == {0: 200.0, 1: 200.0}


def test_failed_power_read_holds_current_limit_as_demand():
    gpus = [h100(0, power_w=None, limit_w=400), h100(1, power_w=100, limit_w=400)]
    d = DemandSplitController(DemandSplitParams(max_raise_w_per_tick=None)).decide(obs(gpus, 600))
    assert d.power_limits_w[0] >= d.power_limits_w[1]
