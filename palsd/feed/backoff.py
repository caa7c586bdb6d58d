"""Reconnect delays: exponential growth with full jitter, pure (the random draw comes in)."""

from __future__ import annotations


def backoff_s(attempt: int, min_s: float, max_s: float, draw: float) -> float:
    """Delay before reconnect attempt `attempt` (0 = first retry); `draw` is uniform in [0, 1).

    Full jitter spreads a fleet that lost the same broker at once, so they do not all reconnect
    in the same instant; the floor keeps a flapping broker from being hammered.
    """
    ceiling = min(max_s, min_s * 2.0 ** min(attempt, 32))
    return min_s + (max(ceiling, min_s) - min_s) * draw
