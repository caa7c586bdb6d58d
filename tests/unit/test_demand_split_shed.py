"""demand_split under an infeasible budget sheds batch limits (as docs/mqtt.md promises) and gives
them back once the budget is feasible again. Pure and table-driven: a sequence of budgets, the
batch limits each tick observes, and the batch limits the controller must ask for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from palsd.core.demand_split import DemandSplitController, DemandSplitParams
from palsd.core.types import BudgetInForce, BudgetSource, Observation, ServerObservation, Slo
from tests.unit.gpus import h100

GPUS = (h100(0), h100(1))  # minimum 200 W each: below 400 W the budget is infeasible
SLO = Slo(ttft_s=2.0, itl_s=0.1)


def server(name: str, batch_limit: int | None) -> ServerObservation:
    return ServerObservation(
        name=name,
        url=f"sim://{name}",
        gpu_indices=(0,) if name == "a" else (1,),
        slo=SLO,
        signals=None,
        batch_limit=batch_limit,
        max_num_seqs=256,
    )


def observe(budget_w: float, limits: dict[str, int | None]) -> Observation:
    servers = tuple(server(n, b) for n, b in sorted(limits.items()))
    return Observation(0.0, GPUS, servers, BudgetInForce(budget_w, BudgetSource.FACILITY))


# Each step: (budget_w, batch limits observed, batch limits asked for, infeasible)
TABLES = {
    "shed, hold, give back": [
        (300, {"a": 64, "b": 32}, {"a": 8, "b": 8}, True),
        (300, {"a": 8, "b": 8}, {}, True),  # already shed: nothing more to ask
        (1000, {"a": 8, "b": 8}, {"a": 64, "b": 32}, False),
        (1000, {"a": 64, "b": 32}, {}, False),  # feasible: batch limits untouched
    ],
    "already small is left alone": [
        (300, {"a": 4, "b": 64}, {"b": 8}, True),
        (1000, {"a": 4, "b": 8}, {"b": 64}, False),
    ],
    "unknown batch limit is never touched": [
        (300, {"a": None, "b": 16}, {"b": 8}, True),
        (1000, {"a": None, "b": 8}, {"b": 16}, False),
    ],
    "a server reset while shed is shed again, and gets its first limit back": [
        (300, {"a": 64, "b": 8}, {"a": 8}, True),
        (300, {"a": 256, "b": 8}, {"a": 8}, True),  # vLLM restarted at max_num_seqs
        (1000, {"a": 8, "b": 8}, {"a": 64}, False),
    ],
    "feasible throughout": [
        (1000, {"a": 64, "b": 32}, {}, False),
        (400, {"a": 64, "b": 32}, {}, False),  # exactly the sum of minimums: feasible
    ],
}


@pytest.mark.parametrize("steps", TABLES.values(), ids=TABLES.keys())
def test_batch_limits_under_infeasible_budgets(
    steps: list[tuple[float, dict[str, int | None], dict[str, int], bool]],
) -> None:
    controller = DemandSplitController(DemandSplitParams(max_raise_w_per_tick=None))
    for budget_w, observed, asked, infeasible in steps:
        decision = controller.decide(observe(budget_w, observed))
        assert dict(decision.batch_limits) == asked, (budget_w, observed, decision.reasons)
        assert decision.infeasible is infeasible
        assert (decision.mode == "infeasible") is infeasible
        if infeasible:
            assert decision.power_limits_w == {0: 200.0, 1: 200.0}
            assert any("shed" in r for r in decision.reasons) or not asked


def test_shed_ceiling_is_a_parameter() -> None:
    controller = DemandSplitController(replace(DemandSplitParams(), shed_batch_limit=2))
    decision = controller.decide(observe(300, {"a": 64, "b": 3}))
    assert dict(decision.batch_limits) == {"a": 2, "b": 2}
