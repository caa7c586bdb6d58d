"""The twin against every applicable point of reference/calibration.md; `--speed` for speed.

    python -m palsd.sim.calibrate            # markdown table: point, source, twin, verdict
    python -m palsd.sim.calibrate --speed    # virtual s per real s, 8 x H100, 4 x Mixtral TP=2

Each point carries its tolerance. `match` is True when the twin lands inside it. Where sources
disagree and the twin follows another one, the point carries a `choice` (which source, why) and
`match` checks the replacement claim; every check must match (tests/unit/test_twin_calibration).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palsd.sim.characterise import decode, serve
from palsd.sim.engine import TwinHost
from palsd.sim.gpu_model import A100, H100, H200, GpuSpec, GpuState
from palsd.sim.models import DENSE_8B, MIXTRAL_8X7B, QWEN_MOE
from palsd.sim.workload import PoissonWorkload


@dataclass(frozen=True)
class Check:
    key: str
    point: str
    source: str
    twin: str
    tolerance: str
    match: bool
    departs: str = ""  # a note on how the twin meets the point
    # When sources disagree: which source the twin follows instead and why. `match` is then the
    # verdict on that replacement claim (stated in `tolerance`), and the table says so.
    choice: str = ""


HW_RUN3 = "docs/hardware/run3_h200/measure.json"  # card 1: the full sweep
HW_RUN4 = "docs/hardware/run4_h200_llama8b/measure.json"  # card 2: Llama-8B-shaped decode
HW_RUN5 = "docs/hardware/run5_h200_samecard/sweep/measure.json"  # card 3: sweep subset ...
HW_RUN5_LLAMA = "docs/hardware/run5_h200_samecard/llama/measure.json"  # ... and Llama-8B
HW_RUN6 = "docs/hardware/run6_h200_mixtral/measure.json"  # card 4: Mixtral-shaped, TP=1


def _fmt_range(values: list[float], unit: str) -> str:
    return f"{min(values):.0f}-{max(values):.0f} {unit}"


def hw_limits() -> Check:
    h = (H100.min_limit_w, H100.max_limit_w, H100.default_limit_w)
    h2 = (H200.min_limit_w, H200.max_limit_w, H200.default_limit_w)
    a = (A100.min_limit_w, A100.max_limit_w, A100.default_limit_w)
    return Check(
        "limits",
        "H100 limits 200..700 W, default 700; H200 the same; A100 100..400 W",
        "NVML on real H100s (run1, run2) and an H200 (run3); nvidia-smi dumps",
        f"H100 {h[0]:.0f}..{h[1]:.0f} (default {h[2]:.0f}); H200 {h2[0]:.0f}..{h2[1]:.0f} "
        f"(default {h2[2]:.0f}); A100 {a[0]:.0f}..{a[1]:.0f}",
        "exact",
        h == (200, 700, 700) and h2 == (200, 700, 700) and a[:2] == (100, 400),
    )


def hw_idle() -> Check:
    host = TwinHost(gpu="h100", model="dense-8b", n_gpus=1, workload=PoissonWorkload(1e-9))
    host.step(3.0)
    g = host.gpu_readings()[0]
    no_ctx = H100.idle_w(H100.idle_clock_mhz)
    h200 = (H200.idle_w(H200.idle_clock_mhz), H200.idle_w(H200.max_clock_mhz))
    a_idle = A100.idle_w(A100.idle_clock_mhz)
    ok = (
        119 <= (g.power_w or 0) <= 123
        and g.sm_clock_mhz == H100.max_clock_mhz
        and abs(no_ctx - 75) <= 3
        and abs(h200[0] - 77.4) <= 3
        and abs(h200[1] - 122.1) <= 3
        and 52 <= a_idle <= 68
    )
    return Check(
        "idle",
        "H100 idle 75 W at 345 MHz; 119-123 W at 1980 MHz; A100 idle 52-68 W; "
        "H200 77 W (no context), 122 W at 1980 MHz (context open)",
        "nvidia-smi dumps; measured (run1, run3: a process holding a CUDA context keeps "
        "the GPU at 1980 MHz)",
        f"idle twin host (vLLM holds a context): {g.power_w:.1f} W at {g.sm_clock_mhz:.0f} MHz; "
        f"H100 with no context {no_ctx:.1f} W; H200 {h200[0]:.1f} / {h200[1]:.1f} W; "
        f"A100 {a_idle:.1f} W",
        "±3 W; inside the ranges",
        ok,
    )


def hw_memory_compute() -> Check:
    bw = H100.mem_bw_bytes_per_s / 1e12
    fl = H100.flops_per_s / 1e12
    bw2 = H200.mem_bw_bytes_per_s / 1e12
    ok = abs(bw - 3.0) / 3.0 <= 0.05 and 0.97 <= fl / 790 <= 1.03 and abs(bw2 - 3.98) <= 0.1
    return Check(
        "bw_flops",
        "HBM3 3.35 TB/s (copy ~3.0 TB/s); bf16 GEMM 780-800 TFLOP/s; "
        "H200 weight streaming 3.98-4.05 TB/s",
        "datasheet; measured (H100; H200 run3, KINDS.md)",
        f"H100 {bw:.2f} TB/s achievable, {fl:.0f} TFLOP/s at 1980 MHz; H200 {bw2:.2f} TB/s",
        "bandwidth ±5% of the measured copy; compute ±3% of 790; H200 ±0.1 TB/s",
        ok,
    )


def nvml_averaging() -> Check:
    gpu = GpuState(H100, 0)
    readings: list[float] = []
    for _ in range(40):  # 2 s idle, then a step to full load for 1.5 s, in 50 ms quanta
        gpu.account(0.05, 0.0, 0.0, 0.0, H100.max_clock_mhz)
    before = gpu.power_avg_w
    for _ in range(30):
        gpu.account(0.05, 0.05, 0.2, 0.9, H100.max_clock_mhz)
        readings.append(gpu.power_avg_w)
    instant = gpu.power_instant_w
    final = readings[-1]
    changes = sum(1 for a, b in itertools.pairwise(readings) if a != b)
    reach = next(i for i, r in enumerate(readings) if r >= before + 0.95 * (final - before))
    ok = 8 <= reach <= 20 and changes <= 16 and abs(instant - final) < 1
    return Check(
        "nvml_avg",
        "NVML power: 1 s moving average, 100 ms update; instant available",
        "measured on H100",
        f"after a load step the average moves every 100 ms, reaches 95% after "
        f"{(reach + 1) * 0.05:.2f} s",
        "95% reached in 0.45-1.05 s; updates only on 100 ms bins",
        ok,
    )


DECODE_MODELS = (("mixtral-8x7b", MIXTRAL_8X7B), ("qwen-moe", QWEN_MOE), ("dense-8b", DENSE_8B))


def _phases(path: str = HW_RUN3) -> dict[str, dict[str, Any]]:
    """Steady phases of one measured run (docs/hardware/...), by name."""
    import json
    from pathlib import Path

    full = Path(__file__).resolve().parents[2] / path
    return {p["phase"]: p for p in json.loads(full.read_text())["phases"] if "work" in p}


def _run3() -> dict[str, dict[str, Any]]:
    return _phases(HW_RUN3)


def _on_card(spec: GpuSpec, card_idle_w: float, bytes_per_s: float, flops_per_s: float) -> float:
    """Twin power at 1980 MHz at measured rates, on a card whose idle (context open) reads
    card_idle_w: two cards of one model differ in static power by ~10 W (docs/hardware.md)."""
    f = spec.max_clock_mhz
    return spec.power_w(f, bytes_per_s, flops_per_s) - spec.idle_w(f) + card_idle_w


def h200_stream_sweep() -> Check:
    """The measured CUDA-graphed weight-streaming sweeps (two cards), step by step."""
    errs_sps, errs_f, cap_ok = [], [], True
    for path in (HW_RUN3, HW_RUN5):
        for name, ph in _phases(path).items():
            if not name.startswith("stream_b") or name.endswith("again"):
                continue
            w, nv = ph["work"], ph["nvml"]
            st = H200.steady_step(w["bytes_per_step"], w["flops_per_step"], 700.0)
            errs_sps.append(st.steps_per_s / (w["steps"] / w["gpu_s"]) - 1)
            errs_f.append(st.sm_mhz / nv["sm_mhz_median"] - 1)
            cap_ok &= st.capped == (nv.get("reason_share", {}).get("sw_power_cap", 0) > 0.5)
    ok = max(map(abs, errs_sps)) <= 0.08 and max(map(abs, errs_f)) <= 0.10 and cap_ok
    return Check(
        "h200_sweep",
        "H200 at its 700 W limit, CUDA-graphed weight-streaming decode step, batch 1-2048, two "
        "cards: 543-612 W at 1980 MHz for batch 1 (uncapped to batch 16), capped from batch "
        "32, clock 1215-1845 MHz, 50-636 steps/s",
        "measured, docs/hardware/run3_h200 and run5_h200_samecard (tools/gpu_measure.py)",
        f"`twin step` on each point's bytes and FLOPs: steps/s {min(errs_sps):+.1%}.."
        f"{max(errs_sps):+.1%}, clock {min(errs_f):+.1%}..{max(errs_f):+.1%}, capped where "
        f"measured: {cap_ok}",
        "steps/s ±8%, clock ±10%, capped exactly where SwPowerCap was set",
        ok,
    )


def h200_llama8b() -> Check:
    """A CUDA-graphed Llama-8B-shaped decode step (two cards) through the iteration model."""
    import dataclasses

    from palsd.sim.models import ITER_OVERHEAD_S, PER_SEQ_OVERHEAD_S, iteration_cost

    # the measured step: 7.5B parameters with the LM head, ~22 kernels a layer (unfused torch)
    model = dataclasses.replace(DENSE_8B, total_params=7.5e9, small_kernels_per_layer=22)
    errs_t, errs_p = [], []
    for path in (HW_RUN4, HW_RUN5_LLAMA):
        for ph in _phases(path).values():
            if not str(ph.get("kind", "")).startswith("llama8b"):
                continue
            w, nv, b = ph["work"], ph["nvml"], ph["batch"]
            f = nv["sm_mhz_median"]
            c = iteration_cost(model, H200, 1, f, b, b * (ph["ctx"] + 1))
            gpu_s = c.time_s - ITER_OVERHEAD_S - PER_SEQ_OVERHEAD_S * b  # graph replay: no host
            busy_w = H200.power_w(
                f, c.mem_s * H200.bw_at(f) / gpu_s, c.comp_s * H200.flops_at(f) / gpu_s
            )
            duty = gpu_s / (gpu_s + ph.get("gap_s", 0.0))
            p = H200.idle_w(f) + duty * (busy_w - H200.idle_w(f))
            errs_t.append(gpu_s / w["step_s"] - 1)
            errs_p.append(p / nv["power_avg_w_median"] - 1)
    return Check(
        "h200_llama8b",
        "H200, CUDA-graphed Llama-8B-shaped decode step (ctx 1024), two cards: 5.7-16.8 ms, "
        "393-397 W at batch 1, 564-566 W at 64, 692 W capped at 256; 353-512 W with a 1-3 ms "
        "host gap after each step",
        "measured, docs/hardware/run4_h200_llama8b and run5_h200_samecard/llama",
        f"iteration model (the step's own kernel count): time {min(errs_t):+.1%}.."
        f"{max(errs_t):+.1%}, power {min(errs_p):+.1%}..{max(errs_p):+.1%}",
        "step time ±6%, power ±8%",
        max(map(abs, errs_t)) <= 0.06 and max(map(abs, errs_p)) <= 0.08,
    )


def h200_power_points() -> Check:
    """Power at the measured clock and rates, every steady point of three H200 cards."""
    errs: dict[str, list[float]] = {}
    runs = {
        "card 1": (HW_RUN3,),
        "card 2": (HW_RUN4,),
        "card 3": (HW_RUN5, HW_RUN5_LLAMA),
        "card 4": (HW_RUN6,),
    }
    for card, paths in runs.items():
        for path in paths:
            for name, ph in _phases(path).items():
                if ph.get("kind") not in ("stream", "duty", "llama8b", "llama8b_duty", "mixtral"):
                    continue
                if name == "duty_b256_gap2ms":
                    continue
                w, nv = ph["work"], ph["nvml"]
                p = H200.power_w(
                    nv["sm_mhz_median"], w["hbm_tb_per_s"] * 1e12, w["tflop_per_s"] * 1e12
                )
                errs.setdefault(card, []).append(p / nv["power_avg_w_median"] - 1)
    every = [e for v in errs.values() for e in v]
    return Check(
        "h200_power",
        "H200 power at measured clock, HBM bytes/s and tensor FLOP/s: 42 steady points on "
        "four cards, 304-696 W (streams, duty cycles 25-76%, Llama-8B and Mixtral steps, "
        "capped points at 1215-1875 MHz)",
        "measured, docs/hardware/run3_h200, run4_h200_llama8b, run5_h200_samecard, "
        "run6_h200_mixtral",
        "one fit for a typical card: "
        + ", ".join(f"{c} {min(v):+.0%}..{max(v):+.0%}" for c, v in errs.items()),
        "±13% at every point: cards differ by ~12% in dynamic power for the same work (card "
        "1 drew 612 W, card 3 543 W on the same batch-1 stream); duty_b256_gap2ms, a partly "
        "capped burst, is left out (docs/twin.md)",
        max(map(abs, every)) <= 0.13,
    )


def h200_mixtral() -> Check:
    """A CUDA-graphed Mixtral-8x7B-shaped decode step on one H200 through the preset's own
    step model (14 small kernels a layer, as vLLM's fused kernels)."""
    from palsd.sim.gpu_model import step_time_s
    from palsd.sim.models import KV_READ_EFFICIENCY, small_kernel_s

    errs_t, errs_p = [], []
    for ph in _phases(HW_RUN6).values():
        if ph.get("kind") != "mixtral":
            continue
        w, nv, b = ph["work"], ph["nvml"], ph["batch"]
        f = nv["sm_mhz_median"]
        kv = MIXTRAL_8X7B.kv_bytes_per_token * b * (ph["ctx"] + 1)
        bw = H200.bw_at(f)
        # the measured step's batched expert products read all 8 experts at every batch
        mem = w["bytes_per_step"] / bw + kv / bw * (1 / KV_READ_EFFICIENCY - 1)
        t = step_time_s(mem, w["flops_per_step"] / H200.flops_at(f))
        t += small_kernel_s(MIXTRAL_8X7B, H200, f)
        p = H200.power_w(f, w["bytes_per_step"] / t, w["flops_per_step"] / t)
        errs_t.append(t / w["step_s"] - 1)
        errs_p.append(p / nv["power_avg_w_median"] - 1)
    return Check(
        "h200_mixtral",
        "H200, CUDA-graphed Mixtral-8x7B-shaped decode step on one GPU (93 GB streamed, ctx "
        "1024): 23.4 ms and 522 W at batch 1, 26.3 ms and 600 W at 64, capped at 256 (695 W, "
        "1875 MHz, 35.5 ms)",
        "measured, docs/hardware/run6_h200_mixtral",
        f"step model with the preset's kernel count: time {min(errs_t):+.1%}..{max(errs_t):+.1%}, "
        f"power {min(errs_p):+.1%}..{max(errs_p):+.1%}",
        "step time ±10%, power ±8%",
        max(map(abs, errs_t)) <= 0.10 and max(map(abs, errs_p)) <= 0.08,
    )


def h200_dpdf() -> Check:
    """Within a capped phase the firmware swings the clock (a ~1 s cycle) while the work stays
    the same: the slope of instant power against the clock is the voltage-dependent part of
    the power model, measured directly. Phases with >= 150 MHz of swing and r >= 0.9."""
    import csv

    import numpy as np

    from palsd.sim.gpu_model import step_time_s

    root = Path(__file__).resolve().parents[2]
    got = []
    for path in (HW_RUN3, HW_RUN5):
        rows = []
        with (root / path).with_name("samples.csv").open() as fh:
            for r in csv.DictReader(fh):
                if r["power_instant_w"] and r["sm_mhz"]:
                    rows.append((float(r["t_s"]), float(r["sm_mhz"]), float(r["power_instant_w"])))
        for name, ph in _phases(path).items():
            if ph.get("kind") != "stream":
                continue
            w = ph["work"]
            sel = [(f, pw) for t, f, pw in rows if w["t0"] <= t <= w["t1"]]
            x = np.array([f for f, _ in sel])
            y = np.array([pw for _, pw in sel])
            if len(x) < 20 or x.max() - x.min() < 150 or np.corrcoef(x, y)[0, 1] < 0.9:
                continue
            b, fl = w["bytes_per_step"], w["flops_per_step"]

            def power(f: float, b: float = b, fl: float = fl) -> float:
                t = step_time_s(b / H200.bw_at(f), fl / H200.flops_at(f))
                return H200.power_w(f, b / t, fl / t)

            fm = float(np.median(x))
            model = (power(fm + 50) - power(fm - 50)) / 100
            got.append((f"{path.split('/')[2]}:{name}", float(np.polyfit(x, y, 1)[0]), model))
    text = ", ".join(f"{n} {m:.3f} vs {t:.3f}" for n, m, t in got)
    return Check(
        "h200_dpdf",
        "H200, capped weight stream: instant power against the SM clock as the firmware swings "
        "it (work fixed): 0.26-0.30 W/MHz at batch 32-64, 1500-1920 MHz",
        "measured, docs/hardware/run3_h200 and run5 samples.csv (50 ms)",
        f"dP/df measured vs twin, W/MHz: {text}",
        "±15% on every phase with >= 150 MHz of clock swing and r >= 0.9 (at least two)",
        len(got) >= 2 and all(abs(t / m - 1) <= 0.15 for _, m, t in got),
    )


# H100 runs (docs/hardware.md): phase -> (tokens/s or TFLOP/s per run, measured W per run);
# card idle with a context open per run: run1 121.2 W, run2 132.1 W, run2-nd 129.5 W.
H100_CARD_IDLE_W = (121.2, 132.1, 129.5)
H100_DECODE = {
    1: ((234, 245, 230), (202.5, 221.6, 212.7)),
    16: ((1780, 1632, 1631), (275.7, 281.2, 274.5)),
    64: ((6864, 7146, 7416), (288.3, 317.6, 316.4)),
    256: ((26852, 32505, 25802), (345.6, 423.7, 349.2)),
}
H100_MATMUL = {  # size -> (TFLOP/s per run, SM MHz per run), all at the 700 W limit
    4096: ((671.7, 658, 670), (1380, 1365, 1380)),
    8192: ((673.5, 667, 672), (1365, 1350, 1365)),
}
EXPERT_BYTES = 3 * 4096 * 14336 * 2
EXPERT_FLOPS = 2 * 3 * 4096 * 14336


def _loop_rates(batch: int, tokens_per_s: float, layers: int = 4) -> tuple[float, float]:
    """HBM bytes/s and FLOP/s of the eager MoE loop (Mixtral expert shapes, top-2)."""
    touched = MIXTRAL_8X7B.experts_touched(batch)
    bytes_per_step = layers * touched * EXPERT_BYTES
    return bytes_per_step * tokens_per_s / batch, layers * 2 * EXPERT_FLOPS * tokens_per_s


def h100_runs() -> Check:
    errs = []
    for b, (tps, watts) in H100_DECODE.items():
        for t, w, idle in zip(tps, watts, H100_CARD_IDLE_W, strict=True):
            errs.append(_on_card(H100, idle, *_loop_rates(b, t)) / w - 1)
    mm = []
    for n, (tfl, mhz) in H100_MATMUL.items():
        st = H100.steady_step(3.0 * n * n * 2, 2.0 * n**3, 700.0)
        mm += [st.flops_per_s / 1e12 / t - 1 for t in tfl]
        del mhz
    ok = max(map(abs, errs)) <= 0.12 and max(map(abs, mm)) <= 0.08
    return Check(
        "h100_runs",
        "H100 (two cards, three runs): eager MoE decode loop 203-424 W at batch 1-256; bf16 "
        "matmul 4096/8192 held at 700 W at 1350-1380 MHz, 658-674 TFLOP/s",
        "measured, docs/hardware/run1, run2, run2_nodaemon",
        f"decode power at the loop's own rates {min(errs):+.1%}..{max(errs):+.1%}; matmul "
        f"TFLOP/s at a 700 W cap {min(mm):+.1%}..{max(mm):+.1%}",
        "decode ±12% per run (card idle as measured); matmul ±8%",
        ok,
    )


def decode_power() -> Check:
    duty = [
        ph
        for path in (HW_RUN3, HW_RUN4, HW_RUN5, HW_RUN5_LLAMA)
        for name, ph in _phases(path).items()
        if ph.get("kind") in ("duty", "llama8b_duty") and name != "duty_b256_gap2ms"
    ]
    errs = []
    for ph in duty:
        w, nv = ph["work"], ph["nvml"]
        p = H200.power_w(H200.max_clock_mhz, w["hbm_tb_per_s"] * 1e12, w["tflop_per_s"] * 1e12)
        errs.append(p / nv["power_avg_w_median"] - 1)
    per_gpu = [decode("h100", k, b).per_gpu_w for k, _ in DECODE_MODELS for b in (1, 4, 16, 64)]
    return Check(
        "decode_power",
        "decode draws far below TDP: 137-300 W",
        "arXiv 2605.11999 (H200)",
        f"H100 vLLM-like decode, batch 1-64, 3 models: {_fmt_range(per_gpu, 'W')} per GPU; "
        f"measured duty-cycle points through the power model {min(errs):+.1%}..{max(errs):+.1%}",
        "replacement: the measured H200 duty-cycle points (a graphed decode step, then the GPU "
        "idle 0.5-5 ms; streams and Llama-8B steps, three cards: 304-686 W) within ±8%",
        max(map(abs, errs)) <= 0.08,
        choice="sources disagree: a CUDA-graphed Llama-8B-shaped decode step on the H200 draws "
        "393-397 W at batch 1 and 564 W at 64 (run4, run5; a plain weight stream 543-612 W) and "
        "ML.ENERGY puts H100 serving at 300-600 W; 137-300 W holds only at a low duty cycle "
        "(measured: 25% busy -> 304 W). The twin follows the measurements and models the duty "
        "cycle (host time and small kernels between steps)",
    )


def cap_280_not_binding() -> Check:
    """Per GPU: `decode` compares per-GPU power with cap_w (it used to pass 280 W x TP)."""
    ratios = [
        decode("h100", k, b, cap_w=280).tokens_per_s / decode("h100", k, b).tokens_per_s
        for k, _ in DECODE_MODELS
        for b in (1, 16, 64)
    ]
    pts = _run3()
    binds = {}
    for b in (1, 4, 16, 32, 64):
        w = pts[f"stream_b{b}"]["work"]
        binds[b] = H200.steady_step(w["bytes_per_step"], w["flops_per_step"], 700.0).capped
    ok = binds == {1: False, 4: False, 16: False, 32: True, 64: True}
    return Check(
        "cap_280",
        "power caps >= 280 W do not bind in decode",
        "arXiv 2605.11999",
        f"H100 decode at a 280 W cap per GPU: {min(ratios):.3f}-{max(ratios):.3f} of uncapped "
        f"throughput; H200 700 W cap on the measured stream binds at batch "
        f"{[b for b, c in binds.items() if c]}",
        "replacement: a cap binds exactly where the measured H200 says (700 W: not at "
        "batch 1-16, from batch 32 on)",
        ok,
        choice="sources disagree: a 280 W cap binds on a measured decode step that draws 612 W "
        "uncapped (run3); the twin follows the measurement. Caps >= 280 W do not bind only "
        "where the duty cycle keeps average power under them",
    )


def clock_lock_saving() -> Check:
    base = decode("h100", "mixtral-8x7b", 64)
    best = 0.0
    for f in range(700, 1981, 20):
        p = decode("h100", "mixtral-8x7b", 64, clock_mhz=f)
        if p.tokens_per_s >= 0.97 * base.tokens_per_s:
            best = max(best, 1 - p.joules_per_token / base.joules_per_token)
    return Check(
        "clock_lock",
        "locking clocks lower saves up to 32% of decode energy with minimal throughput loss",
        "arXiv 2605.11999",
        f"Mixtral batch 64: {best:.0%} less energy/token at <= 3% throughput loss",
        "15-40%",
        0.15 <= best <= 0.40,
    )


def mlenergy_logistic() -> Check:
    fit = {b: 300 + 300 / (1 + math.exp(-(math.log2(b) - 4.2))) for b in (1, 8, 32, 128, 256)}
    twin = {b: serve("h100", "dense-8b", b).per_gpu_w for b in fit}
    rel = {b: twin[b] / fit[b] - 1 for b in fit}
    values = ", ".join(f"b{b}: {twin[b]:.0f} vs {fit[b]:.0f}" for b in fit)
    rising = all(twin[a] < twin[b] for a, b in itertools.pairwise(fit))
    return Check(
        "mlenergy_pb",
        "H100 serving P(b) = 300 + 300/(1+exp(-(log2 b - 4.2))) W",
        "ML.ENERGY v3 as fitted by others",
        f"dense-8B serving, W per GPU: {values} "
        f"({min(rel.values()):+.0%}..{max(rel.values()):+.0%})",
        "replacement: rising with batch and within ±25% of the fit at batch >= 8 (batch 1: "
        "the twin's duty cycle, not the fit)",
        rising and all(abs(r) <= 0.25 for b, r in rel.items() if b >= 8),
        choice="sources disagree at batch 1: the fit puts it at 304 W, i.e. HBM busy about half "
        "the time; vLLM's measured inter-token latency (~7 ms for an 8B model on an H100, 5.5 ms "
        "of it weight streaming) and the H200's measured power per byte give ~390 W. The twin "
        "follows the measurements; from batch 8 up it lands within the fit's ±25%",
    )


def batch_1_to_32() -> Check:
    d1 = decode("h100", "dense-8b", 1).joules_per_token
    d32 = decode("h100", "dense-8b", 32).joules_per_token
    m = (
        decode("h100", "mixtral-8x7b", 1).joules_per_token
        / decode("h100", "mixtral-8x7b", 32).joules_per_token
    )
    return Check(
        "batch_1_32",
        "decode batch 1 -> 32 cuts energy/token by more than 20x",
        "arXiv 2605.11999",
        f"dense-8B: {d1 / d32:.1f}x (Mixtral: {m:.1f}x, it reads 4x more experts at batch 32)",
        "> 20x for the dense model",
        d1 / d32 > 20,
    )


def larger_batches() -> Check:
    r = (
        serve("h100", "dense-8b", 16).joules_per_token
        / serve("h100", "dense-8b", 256).joules_per_token
    )
    return Check(
        "batch_3_5x",
        "larger batches cut energy/token 3-5x",
        "ML.ENERGY leaderboard v3",
        f"dense-8B serving, batch 16 -> 256: {r:.1f}x",
        "3-5x ±30% (2.1-6.5x)",
        2.1 <= r <= 6.5,
    )


def clock_16_vs_20() -> Check:
    hi = decode("h100", "mixtral-8x7b", 64)
    lo = decode("h100", "mixtral-8x7b", 64, clock_mhz=1600)
    thr = lo.tokens_per_s / hi.tokens_per_s
    en = lo.joules_per_token / hi.joules_per_token
    v2 = H100.volt_frac(1600) ** 2
    mem_share = H100.byte_mem_j / (H100.byte_mem_j + H100.byte_core_j)
    return Check(
        "clock_1600",
        "1.6 GHz vs 2.0 GHz: about the same throughput, < 80% energy",
        "arXiv 2403.20306",
        f"Mixtral batch 64 decode, 1600 vs 1980 MHz: throughput {thr:.3f}x, energy {en:.2f}x",
        "replacement: throughput >= 0.95x and energy 0.80-0.90x (what the fitted voltage "
        f"term gives: v(1600)^2 = {v2:.2f} on the clock-scaled part of decode power only)",
        thr >= 0.95 and 0.80 <= en <= 0.90,
        choice=f"sources disagree: the fit on three H200 cards puts {mem_share:.0%} of the energy "
        "of a streamed byte in HBM and its PHY, which a lower SM clock does not save, so 1.6 GHz "
        "saves ~13% of decode energy, not > 20%; 2403.20306 measured whole inference (prefill "
        "included) on an H100. The twin follows the measured fit",
    )


def samsi_cap() -> Check:
    hi = serve("a100", "dense-8b", 64, cap_w=250)
    lo = serve("a100", "dense-8b", 64, cap_w=175)
    thr = lo.tokens_per_s / hi.tokens_per_s - 1
    en = lo.joules_per_token / hi.joules_per_token - 1
    return Check(
        "samsi",
        "cap 250 -> 175 W: token rate -6.1%, energy -24% (LLaMA-65B)",
        "Samsi et al. 2023",
        f"A100 dense-8B serving batch 64: token rate {thr:+.1%}, energy/token {en:+.1%}",
        "replacement: the direction (rate and energy/token both fall) with rate -0..-30% and "
        "energy -5..-35%",
        -0.30 <= thr < 0.0 and -0.35 <= en <= -0.05,
        choice="sources disagree on what a 175 W cap costs: Samsi's LLaMA-65B ran under "
        "FairScale model parallelism (launch- and communication-bound, far under the cap), the "
        "twin's A100 serves a saturated vLLM at batch 64 whose power sits at the cap. The twin "
        "follows its measured H200/H100 physics, A100 energy terms assumed from them",
    )


def max_q() -> Check:
    base = serve("h100", "mixtral-8x7b", 64)
    found = None
    for cap in range(690, 199, -10):  # from the top down: the first cap that costs 2%
        p = serve("h100", "mixtral-8x7b", 64, cap_w=cap, measure_s=40)
        loss = 1 - p.tokens_per_s / base.tokens_per_s
        if loss >= 0.02:
            found = (cap, loss, 1 - p.power_w / base.power_w)
            break
    if found is None:
        return Check(
            "max_q",
            "Max-Q: 9-12% power saved at 2-3% performance loss",
            "NVIDIA",
            "no cap >= 200 W costs 2% throughput",
            "power saved 5-20%",
            False,
        )
    cap, loss, saved = found
    return Check(
        "max_q",
        "Max-Q: 9-12% power saved at 2-3% performance loss",
        "NVIDIA",
        f"H100 Mixtral serving batch 64 (uncapped {base.per_gpu_w:.0f} W per GPU): the first cap "
        f"costing >= 2% throughput is {cap} W ({loss:.1%} loss) and saves {saved:.0%} power",
        "power saved 5-20% at 2-4% loss",
        0.05 <= saved <= 0.20 and loss <= 0.04,
    )


def pals_batch() -> Check:
    r = {b: serve("a100", "mixtral-8x7b", b).tokens_per_j for b in (1, 32, 64)}
    q = {b: serve("a100", "qwen-moe", b).tokens_per_j for b in (32, 64)}
    gain = r[64] / r[1]
    m3264 = r[64] / r[32] - 1
    q3264 = q[64] / q[32] - 1
    return Check(
        "pals_batch",
        "batch 1 -> 64: tokens/J 1.7-2.1x; 32 -> 64: +2% Mixtral, +7% Qwen",
        "PALS, arXiv 2605.21427 (A100)",
        f"A100 serving: Mixtral 1 -> 64 {gain:.1f}x; 32 -> 64 Mixtral {m3264:+.0%}, "
        f"Qwen {q3264:+.0%}",
        "replacement: batch 1 -> 64 gains 8-30x (the measured H100 MoE loop: 20.7x, "
        "reference table 21.7x) and 32 -> 64 still gains for both",
        8 <= gain <= 30 and m3264 > 0 and q3264 > 0,
        choice="sources disagree: PALS reports 1.7-2.1x; the project's H100 runs measured 20.7x "
        "(run1, J/token 0.87 -> 0.042) and calibration.md's table 21.7x, and arXiv 2605.11999 "
        "> 20x for 1 -> 32. The twin follows the measurements: decode reads the same weights for "
        "1 or 64 sequences",
    )


def pals_caps() -> Check:
    caps = (150, 200, 250, 300, 350, 400)
    qwen = {c: serve("a100", "qwen-moe", 64, cap_w=c).tokens_per_j for c in caps}
    mix = {c: serve("a100", "mixtral-8x7b", 64, cap_w=c).tokens_per_j for c in caps}
    q_peak = max(qwen, key=lambda c: qwen[c])
    m_peak = max(mix, key=lambda c: mix[c])
    q_ok = q_peak in (150, 200, 250) and qwen[400] < qwen[200]
    return Check(
        "pals_caps",
        "Qwen1.5-MoE peaks in tokens/J at a 200 W cap (50% TDP) and "
        "declines above; Mixtral keeps improving up to 400 W",
        "PALS, arXiv 2605.21427 (A100, batch 64)",
        f"Qwen peak at {q_peak} W, {qwen[400] / qwen[200] - 1:+.0%} from 200 to 400 W; "
        f"Mixtral peak at {m_peak} W, {mix[400] / mix[150] - 1:+.0%} from 150 to 400 W",
        "replacement: Qwen's half (peak within 50 W of 200 W, lower at 400 W); Mixtral's peak "
        "below 400 W",
        q_ok and m_peak < 400,
        choice="sources disagree on Mixtral: with the voltage scaling fitted on the H200 (energy "
        "per FLOP and per on-chip byte ~ v^2) no saturated, memory-bound decode gains tokens/J "
        "from 300 to 400 W on an A100; PALS's Mixtral did. The twin follows the measured "
        "physics; Qwen's half of the point holds",
    )


# reference/calibration.md's eager MoE decode table (H100): batch -> (tokens/s, average W)
MOE_BENCH = {
    1: (166, 184),
    4: (391, 205),
    16: (1069, 219),
    64: (4840, 245),
    256: (19559, 294),
    1024: (71315, 458),
}


def moe_microbench() -> Check:
    errs = {b: _on_card(H100, 121.0, *_loop_rates(b, t)) / w - 1 for b, (t, w) in MOE_BENCH.items()}
    ok = all(abs(e) <= 0.12 for e in errs.values())
    return Check(
        "moe_bench",
        "MoE decode microbenchmark: 184 -> 294 W and J/token 1.106 -> "
        "0.015 for batch 1 -> 256 (1 -> 64: 21.7x)",
        "measured (launch-bound, 4 layers)",
        "power at the benchmark's own HBM and FLOP rates: "
        + ", ".join(f"b{b} {e:+.0%}" for b, e in errs.items()),
        "±12% at every batch (card idle 121 W, context open)",
        ok,
        "the twin does not replay the launch-bound loop's timing; its power model is fed the "
        "rates the loop achieved",
    )


def model_shapes() -> Check:
    ma = MIXTRAL_8X7B.active_params / 1e9
    qa = QWEN_MOE.active_params / 1e9
    wb = MIXTRAL_8X7B.total_params * 2 / 1e9
    ok = abs(ma - 12.9) / 12.9 <= 0.03 and abs(qa - 2.7) / 2.7 <= 0.05 and abs(wb - 93) <= 1.5
    return Check(
        "shapes",
        "Mixtral 46.7B/12.9B active, bf16 ~93 GB; Qwen1.5-MoE 14.3B/2.7B",
        "model cards",
        f"Mixtral {ma:.2f}B active, {wb:.1f} GB; Qwen {qa:.2f}B active",
        "active ±3% (Mixtral), ±5% (Qwen)",
        ok,
    )


def experts_touched() -> Check:
    got = MIXTRAL_8X7B.experts_touched(4)
    want = 8 * (1 - (1 - 2 / 8) ** 4)
    return Check(
        "experts",
        "experts touched per layer E(1-(1-k/E)^B)",
        "calibration.md",
        f"Mixtral B=4: {got:.3f}",
        "exact",
        abs(got - want) < 1e-12,
    )


CHECKS: tuple[Callable[[], Check], ...] = (
    hw_limits,
    hw_idle,
    hw_memory_compute,
    nvml_averaging,
    h200_stream_sweep,
    h200_power_points,
    h200_llama8b,
    h200_mixtral,
    h200_dpdf,
    h100_runs,
    decode_power,
    cap_280_not_binding,
    clock_lock_saving,
    mlenergy_logistic,
    batch_1_to_32,
    larger_batches,
    clock_16_vs_20,
    samsi_cap,
    max_q,
    pals_batch,
    pals_caps,
    moe_microbench,
    model_shapes,
    experts_touched,
)

NOT_MODELLED = (
    (
        "B200 cap just above the throughput cliff +24% tokens/J; 480B MoE +26% vs 405B dense +6%",
        "Kim et al. 2026",
        "no B200 preset and no 400B-class models",
    ),
    (
        "joint cap x batch x TP tuning beats batch/TP alone by 1.13-1.18x",
        "PALS",
        "a controller result, not a property of the twin (see docs/controller.md)",
    ),
    ("P_sys = 1.05 * sum(P_GPU) + 340..350 W", "PALS", "the twin models GPUs only"),
    ("DeepSeek-MoE-16B shape", "model card", "not a preset"),
)


def speed(seconds: float = 600.0) -> float:
    host = TwinHost(gpu="h100", model="mixtral-8x7b", n_gpus=8, seed=0)
    t0 = time.perf_counter()
    host.step(seconds)
    return seconds / (time.perf_counter() - t0)


MARK_OPEN = "<!-- calibration-table"
MARK_CLOSE = "<!-- /calibration-table -->"


def table(checks: list[Check] | None = None) -> str:
    rows = ["| point | source | twin | tolerance | verdict |", "|---|---|---|---|---|"]
    for c in checks if checks is not None else [fn() for fn in CHECKS]:
        verdict = "match" if c.match else f"departs: {c.departs or 'unexplained'}"
        if c.match and c.departs:
            verdict = f"match ({c.departs})"
        if c.choice:
            verdict = f"choice ({'met' if c.match else 'NOT met'}): {c.choice}"
        rows.append(f"| {c.point} | {c.source} | {c.twin} | {c.tolerance} | {verdict} |")
    for point, source, why in NOT_MODELLED:
        rows.append(f"| {point} | {source} | - | - | not modelled: {why} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m palsd.sim.calibrate", description=__doc__)
    parser.add_argument("--speed", action="store_true", help="measure engine speed only")
    parser.add_argument("--seconds", type=float, default=600.0, help="virtual seconds for --speed")
    parser.add_argument(
        "--update-doc",
        metavar="MD",
        help="rewrite the table between the calibration-table markers of this markdown file",
    )
    args = parser.parse_args()
    if args.update_doc:
        with open(args.update_doc) as f:
            text = f.read()
        head, sep, rest = text.partition(MARK_OPEN)
        _, sep2, tail = rest.partition(MARK_CLOSE)
        if not (sep and sep2):
            print(f"{args.update_doc}: no calibration-table markers")
            return 2
        line_end = rest.index("\n") + 1
        with open(args.update_doc, "w") as f:
            f.write(head + sep + rest[:line_end] + table() + "\n" + sep2 + tail)
        return 0
    if args.speed:
        x = speed(args.seconds)
        print(
            f"8 x H100, 4 x Mixtral-8x7B TP=2, default Poisson load: {args.seconds:.0f} "
            f"virtual s at {x:.0f}x real time ({3600 / x:.1f} s per simulated hour)"
        )
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
