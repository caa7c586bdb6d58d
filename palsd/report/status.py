"""The status model: one JSON-able dict built from the last tick, shared by the local API,
`palsctl status` and the MQTT status topic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from palsd.core.types import BudgetInForce, Decision, GpuObservation, ServerObservation, Slo


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def slo_met(server: ServerObservation) -> bool | None:
    """Whether the windowed quantiles meet the server's SLO; None without fresh data."""
    sig = server.signals
    if sig is None:
        return None
    checks: list[bool] = []
    slo: Slo = server.slo
    for target, quantiles, q in (
        (slo.ttft_s, sig.ttft_s, slo.ttft_quantile),
        (slo.itl_s, sig.itl_s, slo.itl_quantile),
    ):
        if target is None:
            continue
        value = {0.5: quantiles.p50, 0.9: quantiles.p90, 0.99: quantiles.p99}[q]
        if value is not None:
            checks.append(value <= target)
    if slo.min_generation_tokens_per_s is not None and sig.waiting > 0:
        checks.append(sig.generation_tokens_per_s >= slo.min_generation_tokens_per_s)
    return all(checks)


def gpu_status(g: GpuObservation) -> dict[str, Any]:
    return {
        "index": g.index,
        "name": g.name,
        "uuid": g.uuid,
        "power_w": _round(g.power_w, 1),
        "power_instant_w": _round(g.power_instant_w, 1),
        "energy_j": _round(g.energy_j, 1),
        "power_limit_w": _round(g.power_limit_w, 1),
        "enforced_limit_w": _round(g.enforced_limit_w, 1),
        "min_limit_w": g.min_limit_w,
        "max_limit_w": g.max_limit_w,
        "default_limit_w": g.default_limit_w,
        "sm_clock_mhz": g.sm_clock_mhz,
    }


def server_status(s: ServerObservation, stale_reason: str | None) -> dict[str, Any]:
    sig = s.signals
    out: dict[str, Any] = {
        "name": s.name,
        "url": s.url,
        "gpus": list(s.gpu_indices),
        "up": sig is not None,
        "stale_reason": stale_reason,
        "running": None if sig is None else sig.running,
        "waiting": None if sig is None else sig.waiting,
        "batch_limit": s.batch_limit,
        "max_num_seqs": s.max_num_seqs,
        "generation_tokens_per_s": None if sig is None else _round(sig.generation_tokens_per_s),
        "requests_per_s": None if sig is None else _round(sig.requests_per_s),
        "kv_cache_usage": None if sig is None else _round(sig.kv_cache_usage),
        "slo_met": slo_met(s),
    }
    if sig is not None:
        for key, q in (("ttft_s", sig.ttft_s), ("itl_s", sig.itl_s), ("e2e_s", sig.e2e_s)):
            out[key] = {"p50": _round(q.p50, 4), "p90": _round(q.p90, 4), "p99": _round(q.p99, 4)}
    return out


def budget_status(b: BudgetInForce, infeasible: bool) -> dict[str, Any]:
    return {
        "effective_w": b.effective_w,
        "source": b.source.value,
        "expires_at": b.expires_at,
        "reason": b.reason,
        "origin": b.origin,
        "seq": b.seq,
        "infeasible": infeasible,
    }


def decision_status(d: Decision | None, at: float | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "at": at,
        "mode": d.mode,
        "reasons": list(d.reasons),
        "power_limits_w": {str(k): v for k, v in sorted(d.power_limits_w.items())},
        "batch_limits": dict(d.batch_limits),
        "infeasible": d.infeasible,
    }


def build_status(
    *,
    gpus: Sequence[GpuObservation],
    servers: Sequence[ServerObservation],
    stale_reasons: Mapping[str, str | None],
    budget: BudgetInForce,
    decision: Decision | None,
    decided_at: float | None,
    controller: str,
    dry_run: bool,
    period_s: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    infeasible = bool(decision and decision.infeasible)
    status: dict[str, Any] = {
        "gpus": [gpu_status(g) for g in gpus],
        "servers": [server_status(s, stale_reasons.get(s.name)) for s in servers],
        "budget": budget_status(budget, infeasible),
        "power": {
            "sum_power_w": _round(sum(g.power_w or 0.0 for g in gpus), 1),
            "sum_limit_w": _round(sum(g.power_limit_w for g in gpus), 1),
        },
        "controller": {
            "name": controller,
            "mode": decision.mode if decision else "starting",
            "dry_run": dry_run,
            "period_s": period_s,
            "last_decision": decision_status(decision, decided_at),
        },
        "infeasible": infeasible,
    }
    if extra:
        status.update(extra)
    return status
