"""Engine-side half of the plugin: EngineCore methods that read and set the scheduler's live
admission limit. Runs inside vLLM's engine-core process; imports vLLM lazily."""

from __future__ import annotations

import logging
from typing import Any

from palsd.vllm_plugin.contract import GET_METHOD, MIN_VLLM, SET_METHOD

# Under "vllm." so the lines land in vLLM's own log, with its format and level.
log = logging.getLogger("vllm.palsd_batch_limit")

# Scheduler attributes the limit needs (vLLM >= 0.31, V1 engine).
REQUIRED = ("max_num_running_reqs", "max_num_active_reqs", "running", "waiting")


def missing_hook(core: Any) -> str | None:
    """Why this vLLM's scheduler cannot take a batch limit, or None when it can."""
    missing = [a for a in REQUIRED if not hasattr(getattr(core, "scheduler", None), a)]
    if not missing:
        return None
    return (
        f"this vLLM's scheduler lacks {missing}: palsd's batch limit needs vLLM >= "
        f"{MIN_VLLM} (V1 engine, Scheduler.max_num_active_reqs)"
    )


def _state(sched: Any) -> dict[str, int]:
    if hasattr(sched, "get_request_counts"):
        running, waiting = sched.get_request_counts()
    else:
        running, waiting = len(sched.running), len(sched.waiting)
    return {
        "max_num_seqs": int(sched.max_num_running_reqs),
        "limit": int(sched.max_num_active_reqs),
        "running": int(running),
        "waiting": int(waiting),
    }


# The methods answer {"error": reason} rather than raise: a raise becomes a traceback in
# vLLM's log for every call, and the endpoint turns the reason into one 501 and one line.
def get_batch_limit(self: Any) -> dict[str, Any]:
    why = missing_hook(self)
    return {"error": why} if why else _state(self.scheduler)


def set_batch_limit(self: Any, limit: int) -> dict[str, Any]:
    """Admission limit into RUNNING. Lowering it preempts nothing: the running set drains as
    requests finish. Clamped to 1..max_num_seqs, which sizes the engine's buffers."""
    why = missing_hook(self)
    if why:
        return {"error": why}
    sched = self.scheduler
    new = max(1, min(int(limit), int(sched.max_num_running_reqs)))
    if new != sched.max_num_active_reqs:
        log.info("palsd: batch limit %s -> %s", sched.max_num_active_reqs, new)
        sched.max_num_active_reqs = new
    return _state(sched)


def install() -> bool:
    """Add the methods to EngineCore. False (logged) when this vLLM has no V1 EngineCore."""
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError as e:
        log.error(
            "palsd batch-limit plugin: no vllm.v1.engine.core.EngineCore (%s); "
            "palsd's batch limit needs vLLM >= %s",
            e,
            MIN_VLLM,
        )
        return False
    setattr(EngineCore, GET_METHOD, get_batch_limit)
    setattr(EngineCore, SET_METHOD, set_batch_limit)
    return True
