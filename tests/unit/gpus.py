"""Plain GPU observations for pure tests."""

from __future__ import annotations

from palsd.core.types import GpuObservation


def h100(index: int, power_w: float | None = 300.0, limit_w: float = 700.0) -> GpuObservation:
    return GpuObservation(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index:04d}",
        power_w=power_w,
        power_instant_w=power_w,
        energy_j=1000.0,
        power_limit_w=limit_w,
        enforced_limit_w=limit_w,
        min_limit_w=200.0,
        max_limit_w=700.0,
        default_limit_w=700.0,
    )
