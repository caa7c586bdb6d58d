"""Measurements of the twin used by calibration: steady decode (from the iteration model) and
saturated serving (the full engine under a backlog), each at a chosen clock or power cap."""

from __future__ import annotations

from dataclasses import dataclass

from palsd.sim.engine import TwinHost
from palsd.sim.gpu_model import GPU_PRESETS
from palsd.sim.models import MODEL_PRESETS, iteration_cost
from palsd.sim.workload import BacklogWorkload


@dataclass(frozen=True)
class Point:
    power_w: float  # the whole TP group
    tokens_per_s: float  # the server (TP group)
    clock_mhz: float
    tp: int

    @property
    def per_gpu_w(self) -> float:
        return self.power_w / self.tp

    @property
    def joules_per_token(self) -> float:
        return self.power_w / self.tokens_per_s

    @property
    def tokens_per_j(self) -> float:
        return 1.0 / self.joules_per_token


def decode(
    gpu: str,
    model: str,
    batch: int,
    ctx_tokens: int = 1024,
    clock_mhz: float | None = None,
    cap_w: float | None = None,
) -> Point:
    """Steady pure decode at `batch` sequences of `ctx_tokens` context each."""
    g = GPU_PRESETS[gpu]
    m = MODEL_PRESETS[model]
    tp = m.default_tp

    def at(f: float) -> tuple[float, float]:
        c = iteration_cost(m, g, tp, f, batch, batch * ctx_tokens)
        t = c.time_s
        return g.busy_power_w(f, c.mem_s / t, c.comp_s / t), batch / t

    f = clock_mhz or g.max_clock_mhz
    if cap_w is not None and at(f)[0] > cap_w:
        lo, hi = 0.2 * g.max_clock_mhz, f
        for _ in range(40):  # the steady state the cap loop settles to
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid)[0] <= cap_w else (lo, mid)
        f = lo
    p, tps = at(f)
    return Point(p * tp, tps, f, tp)


def serve(
    gpu: str,
    model: str,
    batch: int,
    cap_w: float | None = None,
    warm_s: float = 20.0,
    measure_s: float = 60.0,
    seed: int = 0,
) -> Point:
    """Saturated serving (prefill + decode) at batch limit `batch` on one server."""
    tp = MODEL_PRESETS[model].default_tp
    host = TwinHost(
        gpu=gpu,
        model=model,
        n_gpus=tp,
        workload=BacklogWorkload(),
        seed=seed,
        max_num_seqs=max(256, batch),
        initial_batch_limit=batch,
    )
    if cap_w is not None:
        for i in range(tp):
            host.set_power_limit_w(i, cap_w)
    host.step(warm_s)
    e0, t0 = host.energy_j_total(), host.tokens_generated_total(0)
    host.step(measure_s)
    e1, t1 = host.energy_j_total(), host.tokens_generated_total(0)
    clock = host.gpu_readings()[0].sm_clock_mhz or 0.0
    return Point((e1 - e0) / measure_s, (t1 - t0) / measure_s, clock, tp)
