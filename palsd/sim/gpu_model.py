"""GPU presets and the per-GPU power / clock / telemetry state of the twin.

Power model (all per GPU, watts):
    busy:  P = idle(f) + mem_w * u_mem
               + sm_w * (f / f_max)^3 * min(1, u_comp + sm_mem_share * u_mem)
    idle:  P = idle(f_idle)
    idle(f) = idle_base_w + idle_clock_w * (f / f_max)^3
where u_mem and u_comp are the fractions of busy time spent moving bytes at full bandwidth and
computing at full rate. The cube stands for f * V^2 with voltage rising with the clock.
A power cap is enforced the way the firmware does it: by lowering the SM clock, with a settling
time constant, never instantly. NVML-like telemetry: 100 ms bins, a 1 s moving average, an
instant reading and an energy counter.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from palsd.core.types import GpuObservation


@dataclass(frozen=True)
class GpuSpec:
    name: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    max_clock_mhz: float
    idle_clock_mhz: float
    hbm_bytes: float
    mem_bw_bytes_per_s: float  # achievable (device-to-device copy), not the datasheet figure
    flops_per_s: float  # achievable bf16 at max clock for the serving mix
    idle_base_w: float
    idle_clock_w: float
    mem_w: float
    sm_w: float
    sm_mem_share: float  # SM activity while memory-bound, as a share of u_mem
    bw_knee_frac: float  # below this fraction of max clock the SMs cannot saturate HBM
    nvlink_bytes_per_s: float
    settle_tau_s: float = 0.15  # time constant of the power-cap clock controller

    def idle_w(self, clock_mhz: float) -> float:
        return self.idle_base_w + self.idle_clock_w * (clock_mhz / self.max_clock_mhz) ** 3

    def bw_at(self, clock_mhz: float) -> float:
        frac = clock_mhz / self.max_clock_mhz
        return self.mem_bw_bytes_per_s * min(1.0, frac / self.bw_knee_frac)

    def flops_at(self, clock_mhz: float) -> float:
        return self.flops_per_s * clock_mhz / self.max_clock_mhz

    def busy_power_w(self, clock_mhz: float, u_mem: float, u_comp: float) -> float:
        cube = (clock_mhz / self.max_clock_mhz) ** 3
        sm_activity = min(1.0, u_comp + self.sm_mem_share * u_mem)
        return self.idle_w(clock_mhz) + self.mem_w * u_mem + self.sm_w * cube * sm_activity


# H100 SXM5 80GB: limits and idle from NVML on a real H100 and public nvidia-smi dumps; HBM3
# 3.35 TB/s datasheet, ~3.0 TB/s measured copy; ~790 TFLOP/s measured bf16 GEMM, derated to
# 700 for the serving mix. idle(345 MHz) = 75 W, idle(1980 MHz) = 121 W.
H100 = GpuSpec(
    name="NVIDIA H100 80GB HBM3",
    min_limit_w=200.0,
    max_limit_w=700.0,
    default_limit_w=700.0,
    max_clock_mhz=1980.0,
    idle_clock_mhz=345.0,
    hbm_bytes=80e9,
    mem_bw_bytes_per_s=3.0e12,
    flops_per_s=700e12,
    idle_base_w=74.75,
    idle_clock_w=46.25,
    mem_w=60.0,
    sm_w=480.0,
    sm_mem_share=0.15,
    bw_knee_frac=0.7,
    nvlink_bytes_per_s=450e9,
)

# A100 SXM4 80GB: 100..400 W, idle 52-68 W (public nvidia-smi dumps); 2.04 TB/s datasheet,
# ~1.8 TB/s achievable; 312 TFLOP/s peak bf16, ~250 achievable in serving.
A100 = GpuSpec(
    name="NVIDIA A100-SXM4-80GB",
    min_limit_w=100.0,
    max_limit_w=400.0,
    default_limit_w=400.0,
    max_clock_mhz=1410.0,
    idle_clock_mhz=210.0,
    hbm_bytes=80e9,
    mem_bw_bytes_per_s=1.8e12,
    flops_per_s=250e12,
    idle_base_w=55.0,
    idle_clock_w=30.0,
    mem_w=50.0,
    sm_w=270.0,
    sm_mem_share=0.15,
    bw_knee_frac=0.7,
    nvlink_bytes_per_s=250e9,
)

GPU_PRESETS: dict[str, GpuSpec] = {"h100": H100, "a100": A100}

IDLE_HOLD_S = 0.5  # a GPU keeps its clock this long after its last work before dropping it
BIN_S = 0.1  # NVML updates its averaged reading every 100 ms ...
AVG_BINS = 10  # ... over a 1 s window


class GpuState:
    """One simulated GPU: limit, clock, telemetry. Mutated only by the engine."""

    def __init__(self, spec: GpuSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.uuid = f"GPU-5151d000-0000-4000-8000-{index:012d}"
        self.power_limit_w = spec.default_limit_w
        self.clock_mhz = spec.max_clock_mhz  # the busy clock the cap controller holds
        self.current_clock_mhz = spec.idle_clock_mhz  # what NVML would report right now
        self.power_instant_w = spec.idle_w(spec.idle_clock_mhz)
        self.energy_j = 0.0
        self._bins: deque[float] = deque([self.power_instant_w] * AVG_BINS, maxlen=AVG_BINS)
        self._bin_energy_j = 0.0
        self._bin_elapsed_s = 0.0
        self._idle_run_s = IDLE_HOLD_S  # starts idle, clock already down

    @property
    def power_avg_w(self) -> float:
        return sum(self._bins) / len(self._bins)

    def set_power_limit_w(self, watts: float) -> None:
        spec = self.spec
        if not (isinstance(watts, int | float) and math.isfinite(watts)):
            raise ValueError(f"power limit must be a number of watts, got {watts!r}")
        if not spec.min_limit_w <= watts <= spec.max_limit_w:
            raise ValueError(
                f"power limit {watts:g} W outside [{spec.min_limit_w:g}, {spec.max_limit_w:g}] W"
            )
        self.power_limit_w = float(watts)

    def account(
        self, dt_s: float, busy_s: float, u_mem: float, u_comp: float, clock_mhz: float
    ) -> None:
        """Charge dt_s of operation: busy_s of it at `clock_mhz` with the given utilisations."""
        spec = self.spec
        idle_s = max(0.0, dt_s - busy_s)
        p_busy = spec.busy_power_w(clock_mhz, u_mem, u_comp) if busy_s > 0 else 0.0
        # gaps between iterations cost idle power at the working clock; only a GPU idle for
        # IDLE_HOLD_S drops to its idle clock (75 W on an H100 instead of ~121 W)
        self._idle_run_s = 0.0 if busy_s > 0 else self._idle_run_s + dt_s
        held = self._idle_run_s < IDLE_HOLD_S
        idle_clock = clock_mhz if held else spec.idle_clock_mhz
        energy = p_busy * busy_s + spec.idle_w(idle_clock) * idle_s
        self.energy_j += energy
        self.power_instant_w = energy / dt_s
        self.current_clock_mhz = idle_clock if busy_s <= 0 else clock_mhz
        self._feed_bins(energy / dt_s, dt_s)
        self._regulate(dt_s, p_busy if busy_s > 0 else None)

    def _feed_bins(self, power_w: float, dt_s: float) -> None:
        while dt_s > 1e-12:
            take = min(dt_s, BIN_S - self._bin_elapsed_s)
            self._bin_energy_j += power_w * take
            self._bin_elapsed_s += take
            dt_s -= take
            if self._bin_elapsed_s >= BIN_S - 1e-9:
                self._bins.append(self._bin_energy_j / self._bin_elapsed_s)
                self._bin_energy_j = 0.0
                self._bin_elapsed_s = 0.0

    def _regulate(self, dt_s: float, p_busy_w: float | None) -> None:
        # The firmware's cap loop: steer the clock so busy power meets the limit. Static power
        # does not scale with the clock, so the dynamic part is estimated before the cube root.
        spec = self.spec
        f = self.clock_mhz
        if p_busy_w is None:
            goal = spec.max_clock_mhz
        else:
            static = spec.idle_base_w
            ratio = max(0.05, (self.power_limit_w - static) / max(1.0, p_busy_w - static))
            goal = f * ratio ** (1.0 / 2.5)
        floor = 0.2 * spec.max_clock_mhz
        goal = min(spec.max_clock_mhz, max(floor, goal))
        self.clock_mhz = f + (goal - f) * (1.0 - math.exp(-dt_s / spec.settle_tau_s))

    def observation(self) -> GpuObservation:
        spec = self.spec
        return GpuObservation(
            index=self.index,
            name=spec.name,
            uuid=self.uuid,
            power_w=round(self.power_avg_w, 3),
            power_instant_w=round(self.power_instant_w, 3),
            energy_j=round(self.energy_j, 3),
            power_limit_w=self.power_limit_w,
            enforced_limit_w=self.power_limit_w,
            min_limit_w=spec.min_limit_w,
            max_limit_w=spec.max_limit_w,
            default_limit_w=spec.default_limit_w,
            sm_clock_mhz=round(self.current_clock_mhz, 1),
        )
