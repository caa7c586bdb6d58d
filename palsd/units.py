"""The one place that converts between NVML's milli-units and palsd's base units."""

from __future__ import annotations


def mw_to_w(value_mw: float) -> float:
    return value_mw / 1000.0


def w_to_mw(value_w: float) -> int:
    # NVML takes integer milliwatts; round down so a limit never rounds above a budget.
    return int(value_w * 1000.0)


def mj_to_j(value_mj: float) -> float:
    return value_mj / 1000.0


def parse_watts(text: str) -> float:
    """Parse '2400', '2400W', '2.4kW' into watts; raise ValueError naming the text."""
    raw = text.strip()
    lowered = raw.lower()
    scale = 1.0
    if lowered.endswith("kw"):
        scale, lowered = 1000.0, lowered[:-2]
    elif lowered.endswith("w"):
        lowered = lowered[:-1]
    try:
        value = float(lowered) * scale
    except ValueError:
        raise ValueError(f"{raw!r} is not a power; write watts like 2400W or 2.4kW") from None
    if value != value or value in (float("inf"), float("-inf")) or value <= 0:
        raise ValueError(f"{raw!r} is not a positive, finite power")
    return value


def parse_duration_s(text: str) -> float:
    """Parse '500ms', '10s', '10m', '2h' or a bare number of seconds."""
    raw = text.strip().lower()
    number, scale = raw, 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if raw.endswith(suffix):
            number, scale = raw[: -len(suffix)], factor
            break
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; write 500ms, 10s, 10m or 2h") from None
    if value != value or value < 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a finite, non-negative duration")
    return value
