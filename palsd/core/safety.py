"""Safety rules every decision passes through before any hardware sees it.

Rules of this file: every limit is clamped into its GPU's NVML constraints; the sum of limits
never exceeds the budget in force (if even the minimum limits exceed it the budget is
infeasible and every GPU gets its minimum); writes are ordered so that limits go down before
any goes up, so the applied sum stays within the budget at every step between two safe states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from palsd.core.types import GpuObservation

# Limits are kept in whole milliwatts (what NVML takes) and always rounded down.
_MW = 1000.0


def floor_mw(value_w: float) -> float:
    return math.floor(value_w * _MW) / _MW


def clamp_limit_w(value_w: float, gpu: GpuObservation) -> float:
    return floor_mw(min(max(value_w, gpu.min_limit_w), gpu.max_limit_w))


@dataclass(frozen=True)
class Fitted:
    limits_w: dict[int, float]
    infeasible: bool
    scaled: bool


def fit_to_budget(
    targets_w: Mapping[int, float],
    gpus: Sequence[GpuObservation],
    budget_w: float | None,
) -> Fitted:
    """Clamp each target into its constraints, then scale the part above the minimums down
    until the sum fits the budget. GPUs missing from `targets_w` keep their current limit."""
    clamped = {g.index: clamp_limit_w(targets_w.get(g.index, g.power_limit_w), g) for g in gpus}
    if budget_w is None:
        return Fitted(clamped, infeasible=False, scaled=False)
    mins = {g.index: g.min_limit_w for g in gpus}
    sum_min = sum(mins.values())
    total = sum(clamped.values())
    if sum_min > budget_w:
        return Fitted({i: floor_mw(m) for i, m in mins.items()}, infeasible=True, scaled=True)
    if total <= budget_w:
        return Fitted(clamped, infeasible=False, scaled=False)
    factor = (budget_w - sum_min) / (total - sum_min)
    scaled = {i: floor_mw(mins[i] + (w - mins[i]) * factor) for i, w in clamped.items()}
    return Fitted(scaled, infeasible=False, scaled=True)


def order_writes(
    current_w: Mapping[int, float],
    target_w: Mapping[int, float],
    tolerance_w: float = 0.5,
    budget_w: float | None = None,
) -> list[tuple[int, float]]:
    """The writes that take `current_w` to `target_w`: every lowering first, then raises.

    A change within `tolerance_w` is not written (idempotent setters, and no NVML write every
    tick for a fraction of a watt): a small raise never, a small lowering only when the sum
    of the limits left after every write still fits `budget_w` (with no budget given, every
    lowering is written, however small: skipping one could leave the sum above a budget)."""
    lowers: list[tuple[int, float]] = []
    raises: list[tuple[int, float]] = []
    small_lowers: list[tuple[int, float]] = []
    for index, target in sorted(target_w.items()):
        now = current_w.get(index)
        if now is not None and now <= target <= now + tolerance_w:
            continue
        if now is not None and now - tolerance_w <= target < now:
            small_lowers.append((index, target))
        elif now is None or target < now:
            lowers.append((index, target))
        else:
            raises.append((index, target))
    if small_lowers:
        after_w = {**current_w, **dict(target_w)}
        for index, _ in small_lowers:
            after_w[index] = current_w[index]
        if budget_w is None or sum(after_w.values()) > budget_w:
            lowers = sorted(lowers + small_lowers)
    return lowers + raises


def limit_raise(
    current_w: Mapping[int, float], target_w: Mapping[int, float], max_raise_w: float | None
) -> dict[int, float]:
    """Slew limit on raises only: lowering is never delayed (a budget must bite at once)."""
    if max_raise_w is None:
        return dict(target_w)
    out: dict[int, float] = {}
    for index, target in target_w.items():
        now = current_w.get(index)
        out[index] = target if now is None or target <= now else min(target, now + max_raise_w)
    return out


def drawn_power_w(gpu: GpuObservation) -> float:
    """What a GPU draws now, for the free-power rule: the instant reading if present, else the
    averaged one; a GPU whose power read failed counts at its current limit (it may draw that
    much, and nothing says it does not)."""
    if gpu.power_instant_w is not None:
        return gpu.power_instant_w
    if gpu.power_w is not None:
        return gpu.power_w
    return gpu.power_limit_w


def power_committed_w(limits_w: Mapping[int, float], gpus: Sequence[GpuObservation]) -> float:
    """sum over GPUs of max(limit, drawn): the power the host may draw at once, counting a GPU
    whose limit was just lowered at what it still draws until its cap loop has brought it down.
    A GPU missing from `limits_w` counts at its current limit."""
    return sum(max(limits_w.get(g.index, g.power_limit_w), drawn_power_w(g)) for g in gpus)


def raise_into_free_power(
    target_w: Mapping[int, float], gpus: Sequence[GpuObservation], budget_w: float | None
) -> dict[int, float]:
    """Raises may only use power that is actually free. Lowerings and holds pass unchanged;
    raises are granted (pro rata to what each asks, never above its target) only out of
    budget - sum(max(limit, drawn)) counted with no raise at all, so a raised cap waits until
    the GPUs whose caps were lowered have actually come down. When nothing is free, no limit
    goes up. Afterwards, whenever some limit went up, power_committed_w(result) <= budget.
    GPUs missing from `target_w` keep their current limit."""
    current = {g.index: g.power_limit_w for g in gpus}
    out = {i: target_w.get(i, c) for i, c in current.items()}
    if budget_w is None:
        return out
    raised = [g for g in gpus if out[g.index] > g.power_limit_w]
    if not raised:
        return out
    base = {i: min(w, current[i]) for i, w in out.items()}
    free_w = budget_w - power_committed_w(base, gpus)
    # What each raise adds to the committed sum if granted in full.
    ask = {
        g.index: max(out[g.index], drawn_power_w(g)) - max(g.power_limit_w, drawn_power_w(g))
        for g in raised
    }
    total_ask = sum(ask.values())
    if total_ask <= free_w:
        return out
    share = 0.0 if free_w <= 0 or total_ask <= 0 else free_w / total_ask
    for g in raised:
        if share <= 0.0:
            out[g.index] = g.power_limit_w
            continue
        start = max(g.power_limit_w, drawn_power_w(g))
        granted = floor_mw(min(out[g.index], start + ask[g.index] * share))
        out[g.index] = max(g.power_limit_w, granted)
    return out


def excursion_w(gpus: Sequence[GpuObservation]) -> float:
    """How far the host's drawn power is above the sum of its limits right now (0 if below):
    the firmware's cap loop lets a GPU overshoot its limit until it has pulled the clock down,
    so a plan that puts the limits' sum at the budget lets the drawn power poke above it."""
    return max(0.0, sum(drawn_power_w(g) - g.power_limit_w for g in gpus))
