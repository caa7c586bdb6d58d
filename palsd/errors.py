"""palsd's error types: each says what went wrong and, where it can, what to do about it."""

from __future__ import annotations


class PalsdError(Exception):
    """Base of every error palsd raises on purpose."""


class GpuError(PalsdError):
    """A GPU backend call failed. `index` is the GPU, None for backend-wide failures."""

    def __init__(self, message: str, index: int | None = None) -> None:
        self.index = index
        super().__init__(message if index is None else f"GPU {index}: {message}")


class GpuPermissionError(GpuError):
    pass


class GpuInvalidArgument(GpuError):
    pass


class GpuNotSupported(GpuError):
    pass


class GpuLost(GpuError):
    pass


class GpuUnavailable(GpuError):
    """The backend itself cannot be reached (no driver, sim host down)."""


class BadInput(PalsdError):
    """Input from outside (API request, MQTT payload, server response) that was rejected.
    `reason` is a short machine label used in metrics; the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
