"""The GPU port: what every backend (NVML, simulated host) offers palsd.

Methods block; the daemon calls them from a worker thread, never on the event loop.
"""

from __future__ import annotations

from typing import Protocol

from palsd.core.types import GpuObservation


class GpuBackend(Protocol):
    name: str

    def read_all(self) -> list[GpuObservation]:
        """One observation per controlled GPU. Raises GpuUnavailable if nothing can be read."""
        ...

    def set_power_limit_w(self, index: int, watts: float) -> None:
        """Set one GPU's power limit. Raises a GpuError subclass on failure."""
        ...

    def close(self) -> None: ...
