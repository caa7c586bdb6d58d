"""The status model: one JSON-able dict built from the last tick, shared by the local API,
`palsctl status` and the MQTT status topic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from palsd.core.slo import slo_met
from palsd.core.types import BudgetInForce, Decision, GpuObservation, ServerObservation


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


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


def server_status(s: ServerObservation, batch_limit_wanted: int | None) -> dict[str, Any]:
    """`batch_limit` is what the server itself reported; `batch_limit_wanted` what palsd's
    controller asked for (the two differ while a write is on its way or refused)."""
    sig = s.signals
    out: dict[str, Any] = {
        "name": s.name,
        "url": s.url,
        "gpus": list(s.gpu_indices),
        "up": sig is not None,
        "stale_reason": s.stale_reason,
        "running": None if sig is None else sig.running,
        "waiting": None if sig is None else sig.waiting,
        "batch_limit": s.batch_limit,
        "batch_limit_wanted": batch_limit_wanted,
        "max_num_seqs": s.max_num_seqs,
        "batch_control": s.batch_control.value,
        "batch_control_reason": s.batch_control_reason,
        "generation_tokens_per_s": None if sig is None else _round(sig.generation_tokens_per_s),
        "requests_per_s": None if sig is None else _round(sig.requests_per_s),
        "kv_cache_usage": None if sig is None else _round(sig.kv_cache_usage),
        "slo_met": slo_met(s.slo, sig),
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
    gpu_stale_reason: str | None,
    servers: Sequence[ServerObservation],
    batch_limits_wanted: Mapping[str, int | None],
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
        # Why the GPUs shown are not from this tick's read (None: they are).
        "gpu_stale_reason": gpu_stale_reason,
        "servers": [server_status(s, batch_limits_wanted.get(s.name)) for s in servers],
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


def health_model(
    last_tick_at: float | None, now_s: float, period_s: float, record_problem: str | None
) -> dict[str, Any]:
    """GET /v1/health: ok while ticks complete (one within five periods, at least 5 s); a
    state record that cannot be saved is reported beside it."""
    age = None if last_tick_at is None else max(0.0, now_s - last_tick_at)
    return {
        "ok": age is not None and age < max(5.0, 5 * period_s),
        "last_tick_age_s": age,
        "state_record_ok": record_problem is None,
        "state_record_problem": record_problem,
    }
