"""SLO arithmetic: how much headroom a server's windowed signals leave against its targets.

Headroom is relative: (target - measured) / target, so 0.2 means 20% below the target and a
negative value is a violation. None means "not measured" (no target, or no sample in the window),
which is never read as a violation: a server with no traffic has nothing to miss.
"""

from __future__ import annotations

from dataclasses import dataclass

from palsd.core.types import Quantiles, ServerSignals, Slo


def quantile_of(q: Quantiles, quantile: float) -> float | None:
    """The windowed quantile an SLO names; an unknown quantile falls back to the next higher."""
    if quantile <= 0.5:
        return q.p50 if q.p50 is not None else q.p90
    if quantile <= 0.9:
        return q.p90 if q.p90 is not None else q.p99
    return q.p99


def relative_headroom(target: float | None, measured: float | None) -> float | None:
    if target is None or measured is None or target <= 0:
        return None
    return (target - measured) / target


@dataclass(frozen=True)
class Headroom:
    """Per-target headroom of one server this tick (None: not measured)."""

    ttft: float | None
    itl: float | None
    throughput: float | None

    @property
    def worst(self) -> float | None:
        known = [h for h in (self.ttft, self.itl, self.throughput) if h is not None]
        return min(known) if known else None

    def meets(self) -> bool:
        worst = self.worst
        return worst is None or worst >= 0.0


def headroom(slo: Slo, signals: ServerSignals) -> Headroom:
    ttft = relative_headroom(slo.ttft_s, quantile_of(signals.ttft_s, slo.ttft_quantile))
    itl = relative_headroom(slo.itl_s, quantile_of(signals.itl_s, slo.itl_quantile))
    throughput: float | None = None
    target = slo.min_generation_tokens_per_s
    # A throughput floor only means something while there is demand to serve: an idle server
    # generating nothing is not in violation.
    if target is not None and target > 0 and (signals.running + signals.waiting) > 0:
        throughput = (signals.generation_tokens_per_s - target) / target
    return Headroom(ttft=ttft, itl=itl, throughput=throughput)


def describe(h: Headroom) -> str:
    parts = []
    for label, value in (("ttft", h.ttft), ("itl", h.itl), ("tput", h.throughput)):
        if value is not None:
            parts.append(f"{label} {value:+.0%}")
    return ", ".join(parts) if parts else "no latency samples"


def slo_met(slo: Slo, signals: ServerSignals | None) -> bool | None:
    """The one definition of "SLO met", for the controller, status and metrics alike.

    None without fresh signals (nothing is known); otherwise True when no measured target has
    negative headroom. A target with no sample in the window is not measured, and a throughput
    floor only counts while there is demand (requests running or waiting): see `headroom`.
    """
    if signals is None:
        return None
    return headroom(slo, signals).meets()
