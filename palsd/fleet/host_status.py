"""What a host tells its coordinators, computed from the daemon's status (pure, no I/O).

The fleet section of the retained status: the power the host would draw unconstrained
(`demand_w`), its floor (sum of minimum limits), its maximum (sum of maximum limits), what it
draws, how urgent its SLOs are, and per coordinated group what the group allows it now and
which allocation of each coordinator it holds (the coordinator's acknowledgement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# A GPU drawing this share of its limit presses against it and would take more.
PRESSING_FRACTION = 0.95
STEP_UP_FRACTION = 0.15  # of the GPU's limit range, asked for above a pressing limit
MARGIN_W = 30.0  # asked for above what a relaxed GPU draws
# Urgency: 0 with this much relative SLO headroom or more, 1 at this much violation or worse.
URGENCY_RELAXED = 0.10
URGENCY_FULL = -0.20


def _f(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def gpu_demand_w(gpu: Mapping[str, Any]) -> float:
    lo, hi = _f(gpu.get("min_limit_w")) or 0.0, _f(gpu.get("max_limit_w")) or 0.0
    limit = _f(gpu.get("power_limit_w")) or hi
    power = _f(gpu.get("power_w"))
    if power is None:
        want = limit  # read failed: ask for what it has
    elif power >= PRESSING_FRACTION * limit:
        want = limit + STEP_UP_FRACTION * (hi - lo)
    else:
        want = power + MARGIN_W
    return min(hi, max(lo, want))


def host_demand_w(gpu_demand_w: float, floor_w: float, max_w: float, urgency: float) -> float:
    """What the host would draw unconstrained: what its GPUs ask for, and at least as much of
    its range above the floor as its SLOs are urgent (a host missing its SLOs under a cap that
    its controller holds low for efficiency does not press against it, yet needs more)."""
    return min(max_w, max(gpu_demand_w, floor_w + urgency * (max_w - floor_w)))


def _headroom(target: Any, measured: Any) -> float | None:
    t, m = _f(target), _f(measured)
    if t is None or m is None or t <= 0:
        return None
    return (t - m) / t


def server_urgency(server: Mapping[str, Any]) -> float:
    """0 (comfortable) .. 1 (violating): from the worst relative headroom of the server's
    latency quantiles against its SLO targets, as published in the status."""
    slo = server.get("slo")
    worst: float | None = None
    if isinstance(slo, Mapping):
        for key, target_key, q_key in (
            ("ttft_s", "ttft_s", "ttft_quantile"),
            ("itl_s", "itl_s", "itl_quantile"),
        ):
            quantiles = server.get(key)
            if not isinstance(quantiles, Mapping):
                continue
            q = {0.5: "p50", 0.9: "p90", 0.99: "p99"}.get(_f(slo.get(q_key)) or 0.9, "p90")
            h = _headroom(slo.get(target_key), quantiles.get(q))
            if h is not None:
                worst = h if worst is None else min(worst, h)
    if worst is None:
        met = server.get("slo_met")
        return 1.0 if met is False else 0.0
    span = URGENCY_RELAXED - URGENCY_FULL
    return min(1.0, max(0.0, (URGENCY_RELAXED - worst) / span))


def fleet_section(status: Mapping[str, Any], groups: Mapping[str, Any]) -> dict[str, Any]:
    """The `fleet` object of the status. `groups` is BudgetBook.fleet_status(now)."""
    gpus = [g for g in status.get("gpus") or [] if isinstance(g, Mapping)]
    servers = [s for s in status.get("servers") or [] if isinstance(s, Mapping)]
    floor_w = math.fsum(_f(g.get("min_limit_w")) or 0.0 for g in gpus)
    max_w = max(floor_w, math.fsum(_f(g.get("max_limit_w")) or 0.0 for g in gpus))
    urgency = max((server_urgency(s) for s in servers), default=0.0)
    demand_w = host_demand_w(math.fsum(gpu_demand_w(g) for g in gpus), floor_w, max_w, urgency)
    return {
        "floor_w": round(floor_w, 3),
        "max_w": round(max_w, 3),
        "demand_w": round(demand_w, 3),
        "draw_w": round(math.fsum(_f(g.get("power_w")) or 0.0 for g in gpus), 3),
        "urgency": round(urgency, 4),
        "groups": dict(groups),
    }


def with_fleet(status: dict[str, Any], sink: Any, now_s: float) -> dict[str, Any]:
    """The status the feed publishes, with the fleet section added when the daemon's budget
    book has coordinated groups. `sink` is the feed's budget sink (the daemon, holding `book`)."""
    book = getattr(sink, "book", None)
    fleet_status = getattr(book, "fleet_status", None)
    if fleet_status is None:
        return status
    groups = fleet_status(now_s)
    if not groups:
        return status
    return {**status, "fleet": fleet_section(status, groups)}
