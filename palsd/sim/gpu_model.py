"""GPU presets and the per-GPU power / clock / telemetry state of the twin.

Power model (per GPU, watts), fitted to read-only measurements on three H200s and checked
against two H100s (docs/hardware.md, docs/twin.md):

    P(f, B, R) = idle(f) + v(f)^2 * (flop_j * R + byte_core_j * B) + byte_mem_j * B
    idle(f)    = idle_base_w + idle_clock_w * (f / f_max)^3
    v(f)       = volt_floor_frac + (1 - volt_floor_frac) * f / f_max

f is the SM clock, B the achieved HBM bytes/s, R the achieved bf16 tensor FLOP/s. Energy per
FLOP and the on-chip (SM, L2, crossbar) part of the energy per byte scale with the square of
the core voltage v(f); the HBM/PHY part of a byte costs the same at any SM clock. Power is
linear in the rates, so a duty cycle (GPU idle at its clock between steps) averages exactly.

Throughput: HBM bandwidth is clock-independent above `bw_knee_frac` of the max clock and falls
linearly below it. Tensor FLOP/s combine a peak that scales with the clock and a ceiling that
does not (operand feed from L2/HBM), as a p-norm: a large matrix product loses less than the
clock does at high clocks (measured: 790 TFLOP/s at 1980 MHz, 663 at 1455) and scales with
the clock at low ones. A step's time is the p-norm (p = 3) of its memory and compute times:
neither hides the other completely.

The power cap is the firmware's loop: every 100 ms it moves the clock toward the one at which
the averaged power meets the limit (a measured H200 settles 0.6-1.3% under it), with a
settling time constant, never instantly. NVML-like telemetry: 100 ms bins, a 1 s moving
average, an instant reading and an energy counter. A GPU on which a process holds a CUDA
context (vLLM always does) idles at its max clock: 121-132 W on an H100, 122 W on an H200.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from palsd.core.types import GpuObservation

OVERLAP_P = 3.0  # a step's time: (mem_s^p + comp_s^p)^(1/p); fitted on the H200 decode sweep
_INV_P = 1.0 / OVERLAP_P


def step_time_s(mem_s: float, comp_s: float) -> float:
    """Time of a step that needs mem_s of HBM transfer and comp_s of tensor work."""
    if mem_s <= 0.0 or comp_s <= 0.0:
        return mem_s + comp_s
    big, small = (mem_s, comp_s) if mem_s >= comp_s else (comp_s, mem_s)
    r = small / big
    return big * (1.0 + r * r * r) ** _INV_P


@dataclass(frozen=True)
class SteadyStep:
    """One step repeated back to back under a power limit, after the cap loop has settled."""

    power_w: float
    sm_mhz: float
    steps_per_s: float
    capped: bool
    hbm_bytes_per_s: float
    flops_per_s: float


@dataclass(frozen=True)
class GpuSpec:
    name: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    max_clock_mhz: float
    idle_clock_mhz: float  # with no CUDA context; with one the GPU idles at max_clock_mhz
    hbm_bytes: float
    mem_bw_bytes_per_s: float  # achievable weight-streaming read bandwidth, not the datasheet's
    flops_peak_per_s: float  # tensor peak at the max clock (scales with the clock)
    flops_ceiling_per_s: float  # what operand feed allows at any clock
    idle_base_w: float
    idle_clock_w: float
    flop_j: float  # energy of one bf16 tensor FLOP at the max clock's voltage
    byte_core_j: float  # on-chip energy of one HBM byte (SM, L2, crossbar) at max voltage
    byte_mem_j: float  # HBM and PHY energy of one byte: independent of the SM clock
    volt_floor_frac: float  # v(f) / v(f_max) = a + (1 - a) f / f_max
    bw_knee_frac: float  # below this fraction of max clock the SMs cannot saturate HBM
    nvlink_bytes_per_s: float
    settle_tau_s: float = 0.15  # time constant of the power-cap clock controller
    small_kernel_scale: float = 1.0  # a launch-bound small kernel's time at max clock vs Hopper
    cap_target_frac: float = 0.99  # the cap loop holds the average this far under the limit

    def idle_w(self, clock_mhz: float) -> float:
        return self.idle_base_w + self.idle_clock_w * (clock_mhz / self.max_clock_mhz) ** 3

    def volt_frac(self, clock_mhz: float) -> float:
        a = self.volt_floor_frac
        return a + (1.0 - a) * clock_mhz / self.max_clock_mhz

    def bw_at(self, clock_mhz: float) -> float:
        frac = clock_mhz / self.max_clock_mhz
        return self.mem_bw_bytes_per_s * min(1.0, frac / self.bw_knee_frac)

    @property
    def flops_per_s(self) -> float:
        """Achievable dense bf16 FLOP/s at the max clock."""
        return self.flops_at(self.max_clock_mhz)

    def flops_at(self, clock_mhz: float) -> float:
        peak = self.flops_peak_per_s * clock_mhz / self.max_clock_mhz
        return 1.0 / step_time_s(1.0 / peak, 1.0 / self.flops_ceiling_per_s)

    def power_w(self, clock_mhz: float, bytes_per_s: float, flops_per_s: float) -> float:
        """Average power at `clock_mhz` while moving bytes_per_s and doing flops_per_s."""
        v = self.volt_frac(clock_mhz)
        return (
            self.idle_w(clock_mhz)
            + v * v * (self.flop_j * flops_per_s + self.byte_core_j * bytes_per_s)
            + self.byte_mem_j * bytes_per_s
        )

    def busy_power_w(self, clock_mhz: float, u_mem: float, u_comp: float) -> float:
        """Power with u_mem of the clock's bandwidth and u_comp of its FLOP/s in use."""
        return self.power_w(
            clock_mhz, u_mem * self.bw_at(clock_mhz), u_comp * self.flops_at(clock_mhz)
        )

    def clock_for_power_mhz(self, target_w: float, bytes_per_s: float, flops_per_s: float) -> float:
        """The clock at which power with these rates equals target_w (rates held fixed),
        within [idle clock, max clock]."""
        lo, hi = self.idle_clock_mhz, self.max_clock_mhz
        if self.power_w(hi, bytes_per_s, flops_per_s) <= target_w:
            return hi
        if self.power_w(lo, bytes_per_s, flops_per_s) >= target_w:
            return lo
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if self.power_w(mid, bytes_per_s, flops_per_s) <= target_w:
                lo = mid
            else:
                hi = mid
        return lo

    def steady_step(self, bytes_: float, flops: float, limit_w: float) -> SteadyStep:
        """A step reading `bytes_` from HBM and doing `flops` bf16 tensor FLOPs, repeated back
        to back under `limit_w`: the clock the cap loop settles at and what it gives."""
        if bytes_ < 0 or flops < 0 or bytes_ + flops <= 0:
            raise ValueError("a step needs bytes >= 0 and flops >= 0, not both zero")

        def at(f: float) -> tuple[float, float, float, float]:
            t = step_time_s(bytes_ / self.bw_at(f), flops / self.flops_at(f))
            b, r = bytes_ / t, flops / t
            return self.power_w(f, b, r), 1.0 / t, b, r

        target = limit_w * self.cap_target_frac
        f = self.max_clock_mhz
        p, sps, b, r = at(f)
        capped = p > target
        if capped:
            lo, hi = self.idle_clock_mhz, f
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if at(mid)[0] <= target:
                    lo = mid
                else:
                    hi = mid
            f = lo
            p, sps, b, r = at(f)
        return SteadyStep(p, f, sps, capped, b, r)


# H200 SXM 141GB, measured read-only on three lent H200s (docs/hardware/run3_h200, run4, run5,
# 2026-11-30): NVML limits 200..700 W (default 700); idle 77-80 W at 345 MHz with no context,
# 122-126 W at 1980 MHz with one; a CUDA-graphed weight-streaming GEMV reads 4.0 TB/s (4.8 on
# the datasheet);
# bf16 GEMM 790 TFLOP/s at 1980 MHz (KINDS.md) and 663 at the 1455 MHz the 700 W cap held,
# which a 1027 TFLOP/s clock-scaled peak (datasheet 989) under a 967 TFLOP/s feed ceiling
# gives. Energy terms least-squares fitted to 38 steady points on the three cards (streams, duty
# cycles, Llama-8B-shaped decode steps): a typical card; cards differ by ~12% in dynamic power.
H200 = GpuSpec(
    name="NVIDIA H200",
    min_limit_w=200.0,
    max_limit_w=700.0,
    default_limit_w=700.0,
    max_clock_mhz=1980.0,
    idle_clock_mhz=345.0,
    hbm_bytes=141e9,
    mem_bw_bytes_per_s=4.0e12,
    flops_peak_per_s=1027e12,
    flops_ceiling_per_s=967e12,
    idle_base_w=77.16,
    idle_clock_w=44.84,
    flop_j=1.01e-12,
    byte_core_j=65.5e-12,
    byte_mem_j=47.4e-12,
    volt_floor_frac=0.5,
    bw_knee_frac=0.55,
    nvlink_bytes_per_s=450e9,
)

# H100 SXM5 80GB: the H200's GH100 die with 80 GB of HBM3 (3.35 TB/s datasheet; weight streaming
# at the H200's 83% of datasheet gives 2.8, a copy ~3.0 measured: 2.9 taken). Limits and idle
# from NVML on two real H100s (docs/hardware.md): 75 W at 345 MHz, 121 W at 1980 MHz (a second
# card read 129-132 W). Energy terms are the H200's (the same GH100 die): with them the model
# reproduces both H100 cards' decode loop (-9..-3%) and matmul (+2..+5%) points (docs/twin.md).
H100 = GpuSpec(
    name="NVIDIA H100 80GB HBM3",
    min_limit_w=200.0,
    max_limit_w=700.0,
    default_limit_w=700.0,
    max_clock_mhz=1980.0,
    idle_clock_mhz=345.0,
    hbm_bytes=80e9,
    mem_bw_bytes_per_s=2.9e12,
    flops_peak_per_s=1027e12,
    flops_ceiling_per_s=967e12,
    idle_base_w=74.75,
    idle_clock_w=46.25,
    flop_j=1.01e-12,
    byte_core_j=65.5e-12,
    byte_mem_j=47.4e-12,
    volt_floor_frac=0.5,
    bw_knee_frac=0.55,
    nvlink_bytes_per_s=450e9,
)

# A100 SXM4 80GB: 100..400 W, idle 52-68 W with no context (public nvidia-smi dumps); 2.04 TB/s
# datasheet, 1.7 TB/s weight streaming at Hopper's 83%; 312 TFLOP/s peak bf16, ~250 achievable
# at 1410 MHz. Not measured here: energy per FLOP and per byte are taken from the H200 fit
# (7 nm vs 4N makes the A100's per-FLOP energy higher, its lower voltage range lower; no
# measurement to separate them), so its figures are assumptions, stated in docs/twin.md.
A100 = GpuSpec(
    name="NVIDIA A100-SXM4-80GB",
    min_limit_w=100.0,
    max_limit_w=400.0,
    default_limit_w=400.0,
    max_clock_mhz=1410.0,
    idle_clock_mhz=210.0,
    hbm_bytes=80e9,
    mem_bw_bytes_per_s=1.7e12,
    flops_peak_per_s=325e12,
    flops_ceiling_per_s=306e12,
    idle_base_w=55.0,
    idle_clock_w=30.0,
    flop_j=1.01e-12,
    byte_core_j=65.5e-12,
    byte_mem_j=47.4e-12,
    volt_floor_frac=0.5,
    bw_knee_frac=0.55,
    nvlink_bytes_per_s=250e9,
    small_kernel_scale=1.4,  # 1410 vs 1980 MHz
)

GPU_PRESETS: dict[str, GpuSpec] = {"h100": H100, "h200": H200, "a100": A100}

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
        # vLLM holds a CUDA context: an idle GPU keeps its max clock (measured, H100 and H200)
        self.current_clock_mhz = spec.max_clock_mhz  # what NVML would report right now
        self.power_instant_w = spec.idle_w(spec.max_clock_mhz)
        self.energy_j = 0.0
        self._bins: deque[float] = deque([self.power_instant_w] * AVG_BINS, maxlen=AVG_BINS)
        # the bins' mean, kept as they change (once per bin): read every quantum by the cap loop
        # and the runner, it would otherwise be summed again at each read
        self._avg_w = sum(self._bins) / len(self._bins)
        self._bin_energy_j = 0.0
        self._bin_elapsed_s = 0.0
        self._idle_run_s = IDLE_HOLD_S  # starts idle
        self._rates_mhz = -1.0  # clock at which _bw, _fl, _v2 and _idle_w were computed
        self._bw = 0.0
        self._fl = 0.0
        self._v2 = 0.0
        self._idle_w = 0.0
        self._idle_max_w = spec.idle_w(spec.max_clock_mhz)

    @property
    def power_avg_w(self) -> float:
        return self._avg_w

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
        """Charge dt_s of operation: busy_s of it at `clock_mhz` with the given utilisations
        (u_mem of the clock's HBM bandwidth, u_comp of its tensor FLOP/s)."""
        spec = self.spec
        idle_s = max(0.0, dt_s - busy_s)
        busy = busy_s > 0
        if clock_mhz != self._rates_mhz:  # the clock changes only while the cap loop steers
            self._rates_mhz = clock_mhz
            self._bw = spec.bw_at(clock_mhz)
            self._fl = spec.flops_at(clock_mhz)
            # power_w's clock-only terms, kept with the rates (the same floats it computes)
            v = spec.volt_frac(clock_mhz)
            self._v2 = v * v
            self._idle_w = spec.idle_w(clock_mhz)
        bytes_per_s = u_mem * self._bw if busy else 0.0
        flops_per_s = u_comp * self._fl if busy else 0.0
        # spec.power_w(clock_mhz, bytes_per_s, flops_per_s), term for term
        p_busy = (
            self._idle_w
            + self._v2 * (spec.flop_j * flops_per_s + spec.byte_core_j * bytes_per_s)
            + spec.byte_mem_j * bytes_per_s
            if busy
            else 0.0
        )
        # gaps between iterations cost idle power at the working clock; a GPU idle for
        # IDLE_HOLD_S is back at its context-idle clock (the max clock: 121 W on an H100)
        self._idle_run_s = 0.0 if busy else self._idle_run_s + dt_s
        held = self._idle_run_s < IDLE_HOLD_S
        idle_w = self._idle_w if held else self._idle_max_w
        energy = p_busy * busy_s + idle_w * idle_s
        power_w = energy / dt_s
        self.energy_j += energy
        self.power_instant_w = power_w
        self.current_clock_mhz = clock_mhz if busy or held else spec.max_clock_mhz
        self._feed_bins(power_w, dt_s)
        if power_w <= self.power_limit_w * spec.cap_target_frac and (
            self.clock_mhz >= spec.max_clock_mhz
        ):
            return  # the usual case with headroom: the cap loop has nothing to steer
        duty = min(1.0, busy_s / dt_s) if busy else 0.0
        self._regulate(dt_s, power_w, bytes_per_s * duty, flops_per_s * duty)

    def _feed_bins(self, power_w: float, dt_s: float) -> None:
        while dt_s > 1e-12:
            take = min(dt_s, BIN_S - self._bin_elapsed_s)
            self._bin_energy_j += power_w * take
            self._bin_elapsed_s += take
            dt_s -= take
            if self._bin_elapsed_s >= BIN_S - 1e-9:
                self._bins.append(self._bin_energy_j / self._bin_elapsed_s)
                self._avg_w = sum(self._bins) / len(self._bins)
                self._bin_energy_j = 0.0
                self._bin_elapsed_s = 0.0

    def _regulate(
        self, dt_s: float, power_w: float, bytes_per_s: float, flops_per_s: float
    ) -> None:
        """The firmware's cap loop: steer the clock toward the one at which the averaged power,
        at this quantum's work rates, meets the limit. Power is linear in the rates, so the
        gaps between steps are accounted for by passing duty-averaged rates. Called by
        account() only when there is something to steer (over target, or a lowered clock)."""
        spec = self.spec
        f = self.clock_mhz
        target = self.power_limit_w * spec.cap_target_frac
        # what the firmware holds is the 1 s average: while it is over, aim the next 100 ms
        # under the limit by as much (the integral action that removes a standing overshoot)
        target -= max(0.0, self.power_avg_w - target)
        goal = _solve_clock_mhz(spec, target, bytes_per_s, flops_per_s, f)
        f += (goal - f) * (1.0 - math.exp(-dt_s / spec.settle_tau_s))
        # snap the last fraction of a MHz (the real clock moves in 15 MHz steps) so that a GPU
        # back under its limit reaches the max clock and leaves the loop
        self.clock_mhz = goal if abs(goal - f) < 0.5 else f

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


def _solve_clock_mhz(
    spec: GpuSpec, target_w: float, bytes_per_s: float, flops_per_s: float, start_mhz: float
) -> float:
    """Newton's method on P(x) = base + c x^3 + (a + (1 - a) x)^2 K1 + K2, x = f / f_max, with
    the rates held: a few steps suffice (P is convex and increasing) and keep the loop cheap."""
    fmax = spec.max_clock_mhz
    a = spec.volt_floor_frac
    k1 = spec.flop_j * flops_per_s + spec.byte_core_j * bytes_per_s
    rest = spec.idle_base_w + spec.byte_mem_j * bytes_per_s - target_w
    c = spec.idle_clock_w
    x_lo = spec.idle_clock_mhz / fmax
    x = min(1.0, max(x_lo, start_mhz / fmax))
    for _ in range(4):
        v = a + (1.0 - a) * x
        g = rest + c * x * x * x + v * v * k1
        dg = 3.0 * c * x * x + 2.0 * (1.0 - a) * v * k1
        x_next = min(1.0, max(x_lo, x - g / dg))
        if x_next == x:
            break  # a fixed point: the steps left would only repeat it
        x = x_next
    return x * fmax
