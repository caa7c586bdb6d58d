"""Measurements of the twin used by calibration: steady decode (from the iteration model) and
saturated serving (the full engine under a backlog), each at a chosen clock or power cap; and a
preset's tokens/J against the power cap (`efficiency_curve`, `write_efficiency_curve`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
        metrics_page=False,
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


# ---- tokens/J against the power cap at a saturating load ----------------------------------

# Host power as PALS fitted it (arXiv 2605.21427): P_sys = 1.05 x sum(P_GPU) + 345 W per host;
# the fixed part shared over an 8-GPU host. palsd.sim.simulate uses the same fit.
HOST_GPU_FACTOR = 1.05
HOST_FIXED_W_PER_GPU = 345.0 / 8
NEAR_FRAC = 0.15  # an optimum within 15% of the limit range of either end counts as that end


@dataclass(frozen=True)
class CurvePoint:
    cap_w: float
    tokens_per_s: float  # the server (TP group)
    power_w: float  # per GPU, measured like the energy counter
    clock_mhz: float

    def tokens_per_j(self, tp: int) -> float:
        return self.tokens_per_s / (self.power_w * tp)

    def tokens_per_j_host(self, tp: int, host_fixed_w_per_gpu: float) -> float:
        per_gpu_w = HOST_GPU_FACTOR * self.power_w + host_fixed_w_per_gpu
        return self.tokens_per_s / (per_gpu_w * tp)


@dataclass(frozen=True)
class EfficiencyCurve:
    """A preset's tokens/J against a fixed power cap, at a saturating load (a backlog at the
    given batch limit), GPU-only and with host power."""

    gpu: str
    model: str
    tp: int
    batch: int
    min_limit_w: float
    max_limit_w: float
    host_fixed_w_per_gpu: float
    points: tuple[CurvePoint, ...]

    def tokens_per_j(self, host: bool = True) -> list[float]:
        if host:
            return [p.tokens_per_j_host(self.tp, self.host_fixed_w_per_gpu) for p in self.points]
        return [p.tokens_per_j(self.tp) for p in self.points]

    def optimum_cap_w(self, host: bool = True) -> float:
        tpj = self.tokens_per_j(host)
        return self.points[max(range(len(tpj)), key=tpj.__getitem__)].cap_w

    def regime(self, host: bool = True) -> str:
        """'floor' (best at or within 15% of the limit range above the minimum), 'max' (at or
        within 15% below the maximum) or 'interior'."""
        best = self.optimum_cap_w(host)
        near = NEAR_FRAC * (self.max_limit_w - self.min_limit_w)
        if best <= self.min_limit_w + near + 1e-9:
            return "floor"
        if best >= self.max_limit_w - near - 1e-9:
            return "max"
        return "interior"

    def to_json(self) -> dict[str, object]:
        host = self.tokens_per_j(True)
        gpu_only = self.tokens_per_j(False)
        return {
            "gpu": self.gpu,
            "model": self.model,
            "tp": self.tp,
            "batch": self.batch,
            "limits_w": [self.min_limit_w, self.max_limit_w],
            "host_power": f"{HOST_GPU_FACTOR} x P_GPU + {self.host_fixed_w_per_gpu:g} W per GPU",
            "optimum_cap_w": {"host": self.optimum_cap_w(True), "gpu": self.optimum_cap_w(False)},
            "regime": {"host": self.regime(True), "gpu": self.regime(False)},
            "points": [
                {
                    "cap_w": p.cap_w,
                    "tokens_per_s": round(p.tokens_per_s, 2),
                    "power_w_per_gpu": round(p.power_w, 2),
                    "sm_clock_mhz": round(p.clock_mhz, 1),
                    "tokens_per_joule": round(g, 5),
                    "tokens_per_joule_host": round(h, 5),
                }
                for p, g, h in zip(self.points, gpu_only, host, strict=True)
            ],
        }


def efficiency_curve(
    gpu: str,
    model: str,
    batch: int = 256,
    step_w: float = 50.0,
    host_fixed_w_per_gpu: float = HOST_FIXED_W_PER_GPU,
    warm_s: float = 30.0,
    measure_s: float = 60.0,
) -> EfficiencyCurve:
    """tokens/J against the cap, from the minimum to the maximum limit in steps of at most
    step_w, each point a saturated server (prefill + decode under a backlog of chat-like
    requests) at `batch`, measured after warm_s for measure_s of virtual time. Shorter windows
    see the backlog's synchronised prefill phases, not the steady state. Costs ~1 s of CPU per
    point for the MoE presets (a few seconds per curve)."""
    spec = GPU_PRESETS[gpu]
    lo, hi = spec.min_limit_w, spec.max_limit_w
    n = max(1, -int(-(hi - lo) // step_w))
    caps = [round(lo + i * (hi - lo) / n, 1) for i in range(n + 1)]
    points = []
    for cap in caps:
        p = serve(gpu, model, batch, cap_w=cap, warm_s=warm_s, measure_s=measure_s)
        points.append(CurvePoint(cap, p.tokens_per_s, p.per_gpu_w, p.clock_mhz))
    return EfficiencyCurve(
        gpu,
        model,
        MODEL_PRESETS[model].default_tp,
        batch,
        lo,
        hi,
        host_fixed_w_per_gpu,
        tuple(points),
    )


def write_efficiency_curve(curve: EfficiencyCurve, out_dir: str | Path) -> tuple[Path, Path]:
    """Write efficiency_curve.json and efficiency_curve.png into out_dir; return both paths."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "efficiency_curve.json"
    js.write_text(json.dumps(curve.to_json(), indent=1) + "\n")
    png = out / "efficiency_curve.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = [p.cap_w for p in curve.points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for host, label, style in ((True, "GPU + host", "o-"), (False, "GPU only", "s--")):
        tpj = curve.tokens_per_j(host)
        ax.plot(caps, tpj, style, label=f"{label} (best {curve.optimum_cap_w(host):.0f} W)")
    ax.set_xlabel("power cap per GPU (W)")
    ax.set_ylabel("tokens per joule")
    ax.set_title(
        f"{curve.model} on {curve.gpu} (TP {curve.tp}), batch {curve.batch}: "
        f"{curve.regime(True)} optimum"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return js, png
