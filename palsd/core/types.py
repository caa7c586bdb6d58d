"""Value objects that flow through one tick: observations in, decisions out.

Everything here is frozen. Times are plain floats in seconds on whatever clock the caller
uses (wall clock in the daemon, virtual time in the simulator); the core never reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class GpuObservation:
    """One GPU as sensed this tick. `None` means the read failed; hold last known good."""

    index: int
    name: str
    uuid: str
    power_w: float | None  # averaged (NVML's 1 s window on Ampere and newer)
    power_instant_w: float | None
    energy_j: float | None  # counter since driver load
    power_limit_w: float  # requested limit (nvmlDeviceGetPowerManagementLimit)
    enforced_limit_w: float | None
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    sm_clock_mhz: float | None = None


@dataclass(frozen=True)
class Quantiles:
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class Slo:
    """A server's latency targets. A None target is not checked."""

    ttft_s: float | None = None
    ttft_quantile: float = 0.9
    itl_s: float | None = None
    itl_quantile: float = 0.9
    min_generation_tokens_per_s: float | None = None


@dataclass(frozen=True)
class ServerSignals:
    """Windowed signals of one vLLM server (summed over its engines)."""

    running: float
    waiting: float
    kv_cache_usage: float | None
    requests_per_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    preemptions_per_s: float
    ttft_s: Quantiles = field(default_factory=Quantiles)
    itl_s: Quantiles = field(default_factory=Quantiles)
    e2e_s: Quantiles = field(default_factory=Quantiles)
    window_s: float = 0.0


class BatchControl(StrEnum):
    """Whether palsd can read and set a server's batch limit, and if not, why.

    Anything but OK means the server is cap-only this tick: its observation carries
    `batch_limit=None` and no batch limit is written to it.
    """

    UNKNOWN = "unknown"  # not read yet (just started)
    OK = "ok"
    PLUGIN_MISSING = "plugin_missing"  # HTTP 404/405: no endpoint (plugin not loaded in vLLM)
    ENGINE_PLUGIN_MISSING = "engine_plugin_missing"  # HTTP 501: endpoint without its engine half
    UNAUTHORISED = "unauthorised"  # HTTP 401/403: the token does not match
    UNREACHABLE = "unreachable"  # transport error, timeout, 5xx or a malformed answer


@dataclass(frozen=True)
class ServerObservation:
    """One configured vLLM server. `signals is None` means stale: the scrape failed or is
    too old. `batch_limit` is the limit the server itself reported (never palsd's wish);
    None when unknown, which is always the case unless `batch_control` is OK."""

    name: str
    url: str
    gpu_indices: tuple[int, ...]
    slo: Slo
    signals: ServerSignals | None
    batch_limit: int | None  # None: unknown (endpoint unreachable or not installed)
    max_num_seqs: int | None
    batch_control: BatchControl = BatchControl.OK
    batch_control_reason: str | None = None  # why batch control is not OK, for reasons/status
    stale_reason: str | None = None  # why `signals` is None, when it is

    @property
    def batch_controllable(self) -> bool:
        """False: treat this server as cap-only (no batch limit can be read or set)."""
        return self.batch_control is BatchControl.OK


class BudgetSource(StrEnum):
    FACILITY = "facility"
    OVERRIDE = "override"
    DEFAULT = "default"
    FALLBACK = "fallback"
    NONE = "none"


@dataclass(frozen=True)
class BudgetInForce:
    """The host budget the controller must obey this tick (None: no budget, only TDP)."""

    effective_w: float | None
    source: BudgetSource
    expires_at: float | None = None
    reason: str = ""
    origin: str = ""
    seq: int | None = None


@dataclass(frozen=True)
class Observation:
    now_s: float
    gpus: tuple[GpuObservation, ...]
    servers: tuple[ServerObservation, ...]
    budget: BudgetInForce
    price_per_mwh: float | None = None  # None: no price received, or the last one expired


@dataclass(frozen=True)
class Decision:
    """What the controller wants: limits per GPU index, batch limit per server name."""

    power_limits_w: Mapping[int, float]
    batch_limits: Mapping[str, int]
    reasons: tuple[str, ...]
    mode: str  # e.g. "unconstrained", "budget-bound", "infeasible", "hold"
    infeasible: bool = False


class Controller(Protocol):
    """Port of the decision step. Implementations hold their own state; no I/O, no clock."""

    name: str

    def decide(self, obs: Observation) -> Decision: ...
