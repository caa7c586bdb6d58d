"""The first controller: split the host budget across GPUs by demand; batch limits untouched
while the budget is feasible.

A GPU whose power presses against its limit asks for more; one well below its limit asks for
what it draws plus a margin. Every GPU gets its minimum, then the rest of the budget is
water-filled towards each demand, and any budget left after that is spread by headroom.

Below the sum of the minimum limits (infeasible) the power caps can do no more, so load is shed
through the batch limits: each server's limit goes down to at most `shed_batch_limit`, and the
limit it had before is remembered and given back once the budget is feasible again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from palsd.core.safety import fit_to_budget, limit_raise
from palsd.core.types import Decision, GpuObservation, Observation


@dataclass(frozen=True)
class DemandSplitParams:
    pressing_fraction: float = 0.95  # power above this share of the limit counts as pressing
    step_up_w: float = 25.0  # what a pressing GPU asks for above its limit
    margin_w: float = 30.0  # what a relaxed GPU keeps above its draw
    max_raise_w_per_tick: float | None = 50.0
    shed_batch_limit: int = 8  # batch limit ceiling while the budget is infeasible


def demand_w(gpu: GpuObservation, p: DemandSplitParams) -> float:
    if gpu.power_w is None:  # read failed: hold the current limit
        return gpu.power_limit_w
    if gpu.power_w >= p.pressing_fraction * gpu.power_limit_w:
        return gpu.power_limit_w + p.step_up_w
    return gpu.power_w + p.margin_w


def water_fill(
    gpus: Sequence[GpuObservation], wants_w: dict[int, float], budget_w: float
) -> dict[int, float]:
    """Give each GPU its minimum, then raise all unsatisfied GPUs evenly until the budget is
    spent or every want is met; leftover budget is spread up to each maximum the same way."""
    alloc = {g.index: g.min_limit_w for g in gpus}
    left = budget_w - sum(alloc.values())
    for caps in (
        {g.index: max(g.min_limit_w, min(wants_w[g.index], g.max_limit_w)) for g in gpus},
        {g.index: g.max_limit_w for g in gpus},
    ):
        while left > 1e-6:
            open_ = [i for i in alloc if alloc[i] < caps[i] - 1e-9]
            if not open_:
                break
            share = left / len(open_)
            for i in open_:
                give = min(share, caps[i] - alloc[i])
                alloc[i] += give
                left -= give
    return alloc


class DemandSplitController:
    name = "demand_split"

    def __init__(self, params: DemandSplitParams | None = None) -> None:
        self.params = params or DemandSplitParams()
        # Server name -> the batch limit it had before an infeasible budget shed it.
        self._shed_from: dict[str, int] = {}

    def decide(self, obs: Observation) -> Decision:
        gpus = obs.gpus
        budget_w = obs.budget.effective_w
        reasons: list[str] = []
        if budget_w is None:
            targets = {g.index: g.default_limit_w for g in gpus}
            mode = "unconstrained"
            reasons.append("no budget in force: every GPU at its default limit")
        else:
            wants = {g.index: demand_w(g, self.params) for g in gpus}
            targets = water_fill(gpus, wants, budget_w)
            pressing = [g.index for g in gpus if wants[g.index] > g.power_limit_w]
            mode = "budget-bound" if sum(wants.values()) > budget_w else "unconstrained"
            reasons.append(
                f"budget {budget_w:.0f} W from {obs.budget.source.value}; "
                f"demand {sum(wants.values()):.0f} W"
            )
            if pressing:
                reasons.append(f"GPUs pressing their limit: {pressing}")
        current = {g.index: g.power_limit_w for g in gpus}
        targets = limit_raise(current, targets, self.params.max_raise_w_per_tick)
        fitted = fit_to_budget(targets, gpus, budget_w)
        if fitted.infeasible:
            mode = "infeasible"
            reasons.append(
                f"budget {budget_w} W is below the sum of minimum limits "
                f"{sum(g.min_limit_w for g in gpus):.0f} W: every GPU at its minimum, batch "
                f"limits shed to at most {self.params.shed_batch_limit}"
            )
        batch_limits = self._batch_limits(obs, fitted.infeasible, reasons)
        return Decision(
            power_limits_w=fitted.limits_w,
            batch_limits=batch_limits,
            reasons=tuple(reasons),
            mode=mode,
            infeasible=fitted.infeasible,
        )

    def _batch_limits(
        self, obs: Observation, infeasible: bool, reasons: list[str]
    ) -> dict[str, int]:
        """Shed while infeasible; give each shed server its old limit back once feasible."""
        out: dict[str, int] = {}
        shed = self.params.shed_batch_limit
        for srv in obs.servers:
            if srv.batch_limit is None:
                continue  # unknown: nothing to shed from, nothing the daemon could restore
            if infeasible:
                if srv.batch_limit > shed:
                    self._shed_from.setdefault(srv.name, srv.batch_limit)
                    out[srv.name] = shed
                    reasons.append(f"{srv.name}: batch limit {srv.batch_limit} -> {shed} (shed)")
            elif srv.name in self._shed_from:
                before = self._shed_from.pop(srv.name)
                out[srv.name] = before
                reasons.append(
                    f"{srv.name}: batch limit {srv.batch_limit} -> {before} (budget feasible again)"
                )
        return out
