"""Plain GPU observations for pure tests (the one definition lives beside the in-memory host)."""

from __future__ import annotations

from palsd.sense.memory import h100

__all__ = ["h100"]
