"""How a group budget is split across hosts: the coordinator's decision, pure and deterministic.

Rules of this file (the host-level demand split, one level up):
1. Every host first gets its floor (the sum of its GPUs' minimum power limits): below it a host
   cannot go at all. If the floors alone exceed the group budget the group is infeasible and
   every host gets the same fraction of its floor, so the sum still equals the budget.
2. What is left is water-filled towards each host's unmet demand (the power it would draw
   unconstrained, above its floor), faster for hosts whose SLOs are in danger: a host's level
   rises at `weight = 1 + URGENCY_GAIN * urgency`.
3. Budget left once every demand is met is spread the same way, up to each host's maximum (the
   sum of its GPUs' maximum limits), as headroom for the next load step.
4. Allocations are rounded down to whole milliwatts; the sum never exceeds the group budget.

Same inputs in any order give the same result (hosts are sorted by id). No I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

URGENCY_GAIN = 9.0  # an urgency of 1 fills ten times faster than a relaxed host
_MW = 1000.0


@dataclass(frozen=True)
class HostNeed:
    """What one host tells the coordinator (from its retained status)."""

    host_id: str
    floor_w: float  # sum of minimum limits
    demand_w: float  # what it would draw unconstrained (>= floor is meaningful)
    max_w: float  # sum of maximum limits
    urgency: float = 0.0  # 0 (SLOs comfortable) .. 1 (violating)

    def __post_init__(self) -> None:
        for name in ("floor_w", "demand_w", "max_w", "urgency"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.host_id}: {name} {value} must be finite and >= 0")
        if self.max_w < self.floor_w:
            raise ValueError(f"{self.host_id}: max_w {self.max_w} < floor_w {self.floor_w}")

    @property
    def weight(self) -> float:
        return 1.0 + URGENCY_GAIN * min(1.0, self.urgency)

    @property
    def want_above_floor_w(self) -> float:
        return min(self.max_w, max(self.demand_w, self.floor_w)) - self.floor_w


@dataclass(frozen=True)
class Allocation:
    group_budget_w: float
    watts: Mapping[str, float]  # host id -> its allocation
    unmet_w: Mapping[str, float]  # host id -> demand above its allocation (0 if met)
    feasible: bool  # False: the floors alone exceed the group budget

    @property
    def total_w(self) -> float:
        return math.fsum(self.watts.values())

    @property
    def unmet_total_w(self) -> float:
        return math.fsum(self.unmet_w.values())


def _floor_mw(value_w: float) -> float:
    return math.floor(value_w * _MW) / _MW


def water_level(caps: Sequence[float], weights: Sequence[float], amount: float) -> list[float]:
    """Fill `amount` into bins that rise at `weight` each and stop at `cap` (exact, sorted
    breakpoints, no iteration limit). Returns the fill per bin; sum <= amount."""
    n = len(caps)
    if amount <= 0 or n == 0:
        return [0.0] * n
    if math.fsum(caps) <= amount:
        return [float(c) for c in caps]
    # Bin i is full at level caps[i] / weights[i]; walk the levels in order.
    order = sorted(range(n), key=lambda i: (caps[i] / weights[i], i))
    left = amount
    open_weight = math.fsum(weights)
    level = 0.0
    for i in order:
        full_at = caps[i] / weights[i]
        cost = (full_at - level) * open_weight
        if cost >= left:
            break
        left -= cost
        level = full_at
        open_weight -= weights[i]
    else:  # pragma: no cover - excluded by the fsum(caps) check above
        return [float(c) for c in caps]
    level += left / open_weight
    return [min(c, level * w) for c, w in zip(caps, weights, strict=True)]


def allocate(group_budget_w: float, hosts: Sequence[HostNeed]) -> Allocation:
    if not math.isfinite(group_budget_w) or group_budget_w < 0:
        raise ValueError(f"group budget {group_budget_w} must be finite and >= 0")
    ids = [h.host_id for h in hosts]
    if len(set(ids)) != len(ids):
        raise ValueError("host ids must be unique")
    hosts = sorted(hosts, key=lambda h: h.host_id)
    floors = [h.floor_w for h in hosts]
    sum_floor = math.fsum(floors)
    if sum_floor > group_budget_w:
        factor = group_budget_w / sum_floor
        raw = [f * factor for f in floors]
        return _finish(group_budget_w, hosts, raw, feasible=False)
    left = group_budget_w - sum_floor
    weights = [h.weight for h in hosts]
    wants = [h.want_above_floor_w for h in hosts]
    first = water_level(wants, weights, left)
    left -= math.fsum(first)
    headroom = [h.max_w - h.floor_w - x for h, x in zip(hosts, first, strict=True)]
    second = water_level(headroom, weights, left) if left > 0 else [0.0] * len(hosts)
    raw = [f + a + b for f, a, b in zip(floors, first, second, strict=True)]
    return _finish(group_budget_w, hosts, raw, feasible=True)


def _finish(
    budget_w: float, hosts: Sequence[HostNeed], raw: Sequence[float], feasible: bool
) -> Allocation:
    watts = [_floor_mw(w) for w in raw]
    if feasible:
        # Rounding must not take a host under its floor (floors need not be whole mW).
        watts = [max(w, h.floor_w) for w, h in zip(watts, hosts, strict=True)]
    # Float sums can land a hair above the budget: take the excess from the largest.
    excess = math.fsum(watts) - budget_w
    while excess > 0:
        i = max(range(len(watts)), key=lambda k: (watts[k] - hosts[k].floor_w, -k))
        watts[i] = _floor_mw(watts[i] - excess) if watts[i] > excess else 0.0
        excess = math.fsum(watts) - budget_w
    out = {h.host_id: w for h, w in zip(hosts, watts, strict=True)}
    unmet = {
        h.host_id: max(0.0, min(h.max_w, max(h.demand_w, h.floor_w)) - w)
        for h, w in zip(hosts, watts, strict=True)
    }
    return Allocation(budget_w, out, unmet, feasible)
