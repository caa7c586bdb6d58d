#!/usr/bin/env python3
"""Read-only power characterisation of one GPU for the twin (issue 10): what the card draws, at
which clock, for the work vLLM's decode actually does.

The load runs in this process (PyTorch); an NVML sampler thread reads, every --period-s, the
1 s averaged and the instant power, the energy counter, SM and memory clocks, clock event
(throttle) reasons, utilisation and temperature. Phases, each a warm-up (not measured) and a
measured part:
- idle before any CUDA context, idle with a context open;
- a device-to-device copy (the achievable HBM bandwidth);
- a CUDA-graphed, weight-streaming decode step: `layers` chained products x @ W_i with
  distinct bf16 weights W_i (K x N, about 6 GiB in all, far beyond L2), replayed back to back
  with no Python between kernels, at batch sizes from 1 (memory-bound GEMV) up to where the
  tensor cores are busy and the power limit binds;
- the same step with an idle gap after each step (a duty cycle, as vLLM's host-side work
  between iterations leaves);
- bf16 matrix products (compute-bound).
Per phase it reports achieved bytes/s and FLOP/s (CUDA events) beside power and clocks.

Nothing is ever written to the GPU: every mutating pynvml function (Set*, Reset*, Clear*, ...)
is replaced by a stub that raises before nvmlInit, and the limit is read before and after.

    python3 tools/gpu_measure.py --out "$OUT"          # on a GPU host (torch + nvidia-ml-py)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

MUTATING = re.compile(r"^nvml(?!EventSet)\w*?(Set|Reset|Clear|Create|Destroy|Modify|Remove)")
REASON_BITS = {
    "gpu_idle": 0x1,
    "app_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}
FI_POWER_AVERAGE = 185  # NVML_FI_DEV_POWER_AVERAGE
FI_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT


def guard_nvml(pynvml: Any) -> list[str]:
    """Replace every mutating pynvml function by one that raises; return their names."""
    blocked = []
    for name in dir(pynvml):
        if MUTATING.match(name) and callable(getattr(pynvml, name)):

            def stub(*_a: Any, _n: str = name, **_k: Any) -> Any:
                raise RuntimeError(f"{_n} is blocked: this tool never writes to the GPU")

            setattr(pynvml, name, stub)
            blocked.append(name)
    return blocked


class Sampler(threading.Thread):
    def __init__(self, pynvml: Any, handle: Any, period_s: float) -> None:
        super().__init__(daemon=True, name="nvml-sampler")
        self.nv = pynvml
        self.h = handle
        self.period_s = period_s
        self.rows: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.errors: dict[str, int] = {}

    def _try(self, key: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            self.errors[key] = self.errors.get(key, 0) + 1
            return None

    def read(self) -> dict[str, Any]:
        nv, h = self.nv, self.h
        t = time.monotonic()
        avg_mw = self._try("power", nv.nvmlDeviceGetPowerUsage, h)
        fields = self._try(
            "fields", nv.nvmlDeviceGetFieldValues, h, [FI_POWER_AVERAGE, FI_POWER_INSTANT]
        )
        f_avg = f_inst = None
        if fields:
            vals = []
            for fv in fields:
                ok = getattr(fv, "nvmlReturn", 0) == 0
                vals.append(fv.value.uiVal / 1000.0 if ok else None)
            f_avg, f_inst = vals[0], vals[1]
        energy_mj = self._try("energy", nv.nvmlDeviceGetTotalEnergyConsumption, h)
        t_energy = time.monotonic()
        sm = self._try("sm", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
        mem = self._try("mem", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if reasons_fn is None:
            reasons_fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
        reasons = self._try("reasons", reasons_fn, h)
        util = self._try("util", nv.nvmlDeviceGetUtilizationRates, h)
        temp = self._try("temp", nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        return {
            "t_s": t,
            "t_energy_s": t_energy,
            "power_avg_w": None if avg_mw is None else avg_mw / 1000.0,
            "power_field_avg_w": f_avg,
            "power_instant_w": f_inst,
            "energy_j": None if energy_mj is None else energy_mj / 1000.0,
            "sm_mhz": sm,
            "mem_mhz": mem,
            "reasons": reasons,
            "util_gpu_pct": None if util is None else util.gpu,
            "util_mem_pct": None if util is None else util.memory,
            "temp_c": temp,
        }

    def run(self) -> None:
        next_t = time.monotonic()
        while not self.stop.is_set():
            self.rows.append(self.read())
            next_t += self.period_s
            time.sleep(max(0.0, next_t - time.monotonic()))


def device_facts(nv: Any, h: Any) -> dict[str, Any]:
    def get(fn: str, *args: Any) -> Any:
        try:
            v = getattr(nv, fn)(h, *args)
            return v.decode() if isinstance(v, bytes) else v
        except Exception as err:
            return f"error: {err}"

    cons = get("nvmlDeviceGetPowerManagementLimitConstraints")
    return {
        "name": get("nvmlDeviceGetName"),
        "uuid": get("nvmlDeviceGetUUID"),
        "driver": nv.nvmlSystemGetDriverVersion(),
        "power_limit_w": get("nvmlDeviceGetPowerManagementLimit") / 1000.0,
        "enforced_limit_w": get("nvmlDeviceGetEnforcedPowerLimit") / 1000.0,
        "default_limit_w": get("nvmlDeviceGetPowerManagementDefaultLimit") / 1000.0,
        "min_limit_w": cons[0] / 1000.0 if isinstance(cons, list | tuple) else cons,
        "max_limit_w": cons[1] / 1000.0 if isinstance(cons, list | tuple) else cons,
        "max_sm_mhz": get("nvmlDeviceGetMaxClockInfo", nv.NVML_CLOCK_SM),
        "max_mem_mhz": get("nvmlDeviceGetMaxClockInfo", nv.NVML_CLOCK_MEM),
        "persistence_mode": get("nvmlDeviceGetPersistenceMode"),
        "compute_mode": get("nvmlDeviceGetComputeMode"),
        "pstate": get("nvmlDeviceGetPerformanceState"),
        "memory_total_bytes": getattr(get("nvmlDeviceGetMemoryInfo"), "total", None),
    }


class Load:
    """The phases; each returns its work (steps, bytes, FLOPs, seconds) over the measured part."""

    def __init__(self, torch: Any, k: int, n: int, layers: int) -> None:
        self.torch = torch
        self.dev = torch.device("cuda:0")
        torch.manual_seed(0)
        self.k, self.n, self.layers = k, n, layers
        scale = 1.0 / math.sqrt(k)
        # distinct weights per layer so each step streams all of them from HBM (not L2)
        self.w = [
            torch.randn(k, n, device=self.dev, dtype=torch.bfloat16) * scale for _ in range(layers)
        ]
        assert k == n, "the chain x @ W_0 @ W_1 ... needs square weights"
        self.weight_bytes = layers * k * n * 2
        torch.cuda.synchronize()

    def _graph(self, body: Any, reps: int) -> Any:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                body()
        torch.cuda.synchronize()
        return g

    def _replay_for(self, g: Any, seconds: float) -> tuple[int, float]:
        """Replay back to back for `seconds` (queue kept 2 deep); return replays and GPU s."""
        torch = self.torch
        evs = [torch.cuda.Event(), torch.cuda.Event()]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t_end = time.monotonic() + seconds
        i = 0
        while True:
            g.replay()
            evs[i % 2].record()
            if i > 0:
                evs[(i - 1) % 2].synchronize()
            i += 1
            if time.monotonic() >= t_end:
                break
        end.record()
        end.synchronize()
        return i, start.elapsed_time(end) / 1000.0

    def stream_step(self, batch: int) -> tuple[Any, float, float]:
        """Body of one decode step at `batch`, its bytes and FLOPs."""
        torch = self.torch
        x0 = torch.randn(batch, self.k, device=self.dev, dtype=torch.bfloat16)
        out = torch.empty(batch, self.n, device=self.dev, dtype=torch.bfloat16)

        def body() -> None:
            x = x0
            for w in self.w:
                x = x @ w
            out.copy_(x)

        act = 2 * batch * (self.k + self.n) * self.layers  # activations in and out
        flops = 2.0 * batch * self.k * self.n * self.layers
        return body, float(self.weight_bytes + act), flops

    def run_graphed(
        self, body: Any, bytes_: float, flops: float, warm_s: float, measure_s: float
    ) -> dict[str, Any]:
        est_s = max(bytes_ / 4.0e12, flops / 7.0e14, 2e-5)
        reps = max(1, min(64, round(0.012 / est_s)))
        g = self._graph(body, reps)
        self._replay_for(g, warm_s)
        t0 = time.monotonic()
        replays, gpu_s = self._replay_for(g, measure_s)
        t1 = time.monotonic()
        steps = replays * reps
        return {
            "t0": t0,
            "t1": t1,
            "steps": steps,
            "gpu_s": gpu_s,
            "step_s": gpu_s / steps,
            "bytes_per_step": bytes_,
            "flops_per_step": flops,
            "hbm_tb_per_s": bytes_ * steps / gpu_s / 1e12,
            "tflop_per_s": flops * steps / gpu_s / 1e12,
            "reps_per_graph": reps,
        }

    def run_duty(
        self, body: Any, bytes_: float, flops: float, gap_s: float, warm_s: float, measure_s: float
    ) -> dict[str, Any]:
        """One graphed step, a host sync, then `gap_s` with the GPU idle: a duty cycle."""
        torch = self.torch
        g = self._graph(body, 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        res: dict[str, Any] = {}
        for part, secs in (("warm", warm_s), ("measure", measure_s)):
            t0 = time.monotonic()
            steps = 0
            busy = 0.0
            while time.monotonic() - t0 < secs:
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                busy += start.elapsed_time(end) / 1000.0
                steps += 1
                until = time.perf_counter() + gap_s
                while time.perf_counter() < until:
                    pass
            t1 = time.monotonic()
            if part == "measure":
                wall = t1 - t0
                res = {
                    "t0": t0,
                    "t1": t1,
                    "steps": steps,
                    "gpu_s": busy,
                    "step_s": busy / steps,
                    "wall_step_s": wall / steps,
                    "duty": busy / wall,
                    "gap_s": gap_s,
                    "bytes_per_step": bytes_,
                    "flops_per_step": flops,
                    "hbm_tb_per_s": bytes_ * steps / wall / 1e12,
                    "tflop_per_s": flops * steps / wall / 1e12,
                }
        return res

    def copy_body(self, gib: float) -> tuple[Any, float, float]:
        torch = self.torch
        n = int(gib * 2**30 // 2)
        src = torch.randn(n, device=self.dev, dtype=torch.bfloat16)
        dst = torch.empty_like(src)

        def body() -> None:
            dst.copy_(src)

        return body, 2.0 * n * 2, 0.0

    def matmul_body(self, size: int) -> tuple[Any, float, float]:
        torch = self.torch
        a = torch.randn(size, size, device=self.dev, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=self.dev, dtype=torch.bfloat16)
        c = torch.empty(size, size, device=self.dev, dtype=torch.bfloat16)

        def body() -> None:
            torch.matmul(a, b, out=c)

        return body, 3.0 * size * size * 2, 2.0 * size**3


class Llama8bDecode:
    """One decode step of a Llama-3.1-8B-shaped model as vLLM runs it in a CUDA graph: per layer
    RMSNorm, fused QKV, rotary, KV-cache write, attention over the cache (GQA 32/8), o-proj,
    residual, RMSNorm, gate-up, SiLU-and-mul, down, residual; then final norm, LM head, argmax.
    Random bf16 weights; every sequence attends over `ctx` cached tokens."""

    hidden, heads, kv_heads, head_dim, ffn, layers, vocab = 4096, 32, 8, 128, 14336, 32, 128256

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        dev = torch.device("cuda:0")
        self.dev = dev
        h, f = self.hidden, self.ffn
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        bf = torch.bfloat16

        def w(*shape: int) -> Any:
            return torch.randn(*shape, device=dev, dtype=bf) * (1.0 / math.sqrt(shape[0]))

        self.w = [(w(h, qkv), w(h, h), w(h, 2 * f), w(f, h)) for _ in range(self.layers)]
        self.norm = torch.ones(h, device=dev, dtype=bf)
        self.lm_head = w(h, self.vocab)
        self.weight_bytes = 2 * (
            self.layers * (h * qkv + h * h + h * 2 * f + f * h) + h * self.vocab
        )
        pos = torch.arange(self.head_dim // 2, device=dev, dtype=torch.float32)
        ang = 1000.0 * (10000.0 ** (-2 * pos / self.head_dim))
        self.cos = torch.cat([ang.cos(), ang.cos()]).to(bf)
        self.sin = torch.cat([ang.sin(), ang.sin()]).to(bf)
        torch.cuda.synchronize()

    def step(self, batch: int, ctx: int) -> tuple[Any, float, float]:
        torch = self.torch
        F = torch.nn.functional
        h, hd, nh, nkv = self.hidden, self.head_dim, self.heads, self.kv_heads
        kc = [
            torch.randn(batch, nkv, ctx + 1, hd, device=self.dev, dtype=torch.bfloat16)
            for _ in range(self.layers)
        ]
        vc = [torch.randn_like(k) for k in kc]
        x0 = torch.randn(batch, h, device=self.dev, dtype=torch.bfloat16)
        out = torch.empty(batch, dtype=torch.long, device=self.dev)
        cos, sin = self.cos, self.sin

        def rope(t: Any) -> Any:
            a, b = t[..., : hd // 2], t[..., hd // 2 :]
            return t * cos + torch.cat([-b, a], dim=-1) * sin

        def body() -> None:
            x = x0
            for layer, (wqkv, wo, w13, w2) in enumerate(self.w):
                y = F.rms_norm(x, (h,), self.norm)
                qkv = y @ wqkv
                q = qkv[:, : nh * hd].view(batch, nh, 1, hd)
                k = qkv[:, nh * hd : (nh + nkv) * hd].view(batch, nkv, 1, hd)
                v = qkv[:, (nh + nkv) * hd :].view(batch, nkv, 1, hd)
                q, k = rope(q), rope(k)
                kc[layer][:, :, ctx : ctx + 1].copy_(k)
                vc[layer][:, :, ctx : ctx + 1].copy_(v)
                a = F.scaled_dot_product_attention(q, kc[layer], vc[layer], enable_gqa=True)
                x = x + a.reshape(batch, nh * hd) @ wo
                y = F.rms_norm(x, (h,), self.norm)
                gu = y @ w13
                x = x + (F.silu(gu[:, : self.ffn]) * gu[:, self.ffn :]) @ w2
            logits = F.rms_norm(x, (h,), self.norm) @ self.lm_head
            out.copy_(logits.argmax(dim=-1))

        kv_bytes = 2 * self.layers * batch * nkv * (ctx + 1) * hd * 2
        params = self.weight_bytes / 2
        flops = 2.0 * params * batch + 4.0 * self.layers * nh * hd * (ctx + 1) * batch
        return body, float(self.weight_bytes + kv_bytes), flops


class MixtralDecode:
    """One decode step of a Mixtral-8x7B-shaped model on one GPU (TP=1: 91 GB of bf16 weights
    fit an H200), in a CUDA graph. Attention as in Llama8bDecode; the MoE layer routes each
    token to 2 of 8 experts (a random routing drawn once per batch, fixed in the graph), gathers
    each expert's tokens (padded to the busiest expert), runs the experts as two batched
    products with SiLU x up between, weights and scatters the results back: about what vLLM's
    fused MoE kernels read and compute, in a handful of kernels a layer."""

    hidden, heads, kv_heads, head_dim, ffn, layers, vocab = 4096, 32, 8, 128, 14336, 32, 32000
    experts, top_k = 8, 2

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        dev = torch.device("cuda:0")
        self.dev = dev
        h, f, e = self.hidden, self.ffn, self.experts
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        bf = torch.bfloat16

        def w(*shape: int) -> Any:
            return torch.empty(*shape, device=dev, dtype=bf).normal_(0.0, shape[-2] ** -0.5)

        self.w = [
            (w(h, qkv), w(h, h), w(h, e), w(e, h, 2 * f), w(e, f, h)) for _ in range(self.layers)
        ]
        self.norm = torch.ones(h, device=dev, dtype=bf)
        self.lm_head = w(h, self.vocab)
        self.attn_params = self.layers * (h * qkv + h * h + h * e) + h * self.vocab
        self.expert_params = 3 * h * f
        pos = torch.arange(self.head_dim // 2, device=dev, dtype=torch.float32)
        ang = 1000.0 * (10000.0 ** (-2 * pos / self.head_dim))
        self.cos = torch.cat([ang.cos(), ang.cos()]).to(bf)
        self.sin = torch.cat([ang.sin(), ang.sin()]).to(bf)
        torch.cuda.synchronize()

    def step(self, batch: int, ctx: int) -> tuple[Any, float, float, dict[str, Any]]:
        torch = self.torch
        F = torch.nn.functional
        h, hd, nh, nkv, e = self.hidden, self.head_dim, self.heads, self.kv_heads, self.experts
        gen = torch.Generator(device="cpu").manual_seed(batch)
        routes = []  # per layer: (index [e, cap], weight [e, cap]) padded with the zero row
        touched = 0
        for _ in range(self.layers):
            choice = torch.rand(batch, e, generator=gen).topk(self.top_k, dim=-1).indices
            lists = [(choice == x).any(dim=-1).nonzero().flatten() for x in range(e)]
            cap = max(1, max(len(li) for li in lists))
            idx = torch.full((e, cap), batch, dtype=torch.long)
            wt = torch.zeros(e, cap)
            for x, li in enumerate(lists):
                idx[x, : len(li)] = li
                wt[x, : len(li)] = 0.5
                touched += int(len(li) > 0)
            routes.append((idx.to(self.dev), wt.to(self.dev, torch.bfloat16)[..., None]))
        kc = [
            torch.randn(batch, nkv, ctx + 1, hd, device=self.dev, dtype=torch.bfloat16)
            for _ in range(self.layers)
        ]
        vc = [torch.randn_like(k) for k in kc]
        x0 = torch.randn(batch, h, device=self.dev, dtype=torch.bfloat16)
        zero_row = torch.zeros(1, h, device=self.dev, dtype=torch.bfloat16)
        out = torch.empty(batch, dtype=torch.long, device=self.dev)
        cos, sin = self.cos, self.sin

        def rope(t: Any) -> Any:
            a, b = t[..., : hd // 2], t[..., hd // 2 :]
            return t * cos + torch.cat([-b, a], dim=-1) * sin

        def body() -> None:
            x = x0
            for layer, (wqkv, wo, wr, w13, w2) in enumerate(self.w):
                y = F.rms_norm(x, (h,), self.norm)
                qkv = y @ wqkv
                q = qkv[:, : nh * hd].view(batch, nh, 1, hd)
                k = qkv[:, nh * hd : (nh + nkv) * hd].view(batch, nkv, 1, hd)
                v = qkv[:, (nh + nkv) * hd :].view(batch, nkv, 1, hd)
                q, k = rope(q), rope(k)
                kc[layer][:, :, ctx : ctx + 1].copy_(k)
                vc[layer][:, :, ctx : ctx + 1].copy_(v)
                a = F.scaled_dot_product_attention(q, kc[layer], vc[layer], enable_gqa=True)
                x = x + a.reshape(batch, nh * hd) @ wo
                y = F.rms_norm(x, (h,), self.norm)
                _ = y @ wr  # router logits (the routing itself is fixed above)
                idx, wt = routes[layer]
                yp = torch.cat([y, zero_row])
                g = torch.bmm(yp[idx], w13)
                act = F.silu(g[..., : self.ffn]) * g[..., self.ffn :]
                z = torch.bmm(act, w2) * wt
                moe = torch.zeros(batch + 1, h, device=self.dev, dtype=torch.bfloat16)
                moe.index_add_(0, idx.flatten(), z.view(-1, h))
                x = x + moe[:batch]
            logits = F.rms_norm(x, (h,), self.norm) @ self.lm_head
            out.copy_(logits.argmax(dim=-1))

        kv_bytes = 2 * self.layers * batch * nkv * (ctx + 1) * hd * 2
        # the batched products read every expert's weights, touched or not (vLLM's fused MoE
        # skips untouched experts; from batch 16 up all 8 are touched anyway)
        weight_bytes = 2 * (self.attn_params + self.layers * e * self.expert_params)
        flops = (
            2.0 * (self.attn_params + self.layers * self.top_k * self.expert_params) * batch
            + 4.0 * self.layers * nh * hd * (ctx + 1) * batch
        )
        info = {"experts_touched_per_layer": touched / self.layers}
        return body, float(weight_bytes + kv_bytes), flops, info


def summarise(rows: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    win = [r for r in rows if t0 <= r["t_s"] <= t1]
    out: dict[str, Any] = {"samples": len(win), "duration_s": t1 - t0}
    if not win:
        return out

    def col(key: str) -> list[float]:
        return [r[key] for r in win if r[key] is not None]

    def med(key: str) -> float | None:
        v = col(key)
        return statistics.median(v) if v else None

    en = [(r["t_energy_s"], r["energy_j"]) for r in win if r["energy_j"] is not None]
    if len(en) >= 2 and en[-1][0] > en[0][0]:
        out["power_counter_w"] = (en[-1][1] - en[0][1]) / (en[-1][0] - en[0][0])
    for key in ("power_avg_w", "power_field_avg_w", "power_instant_w", "sm_mhz", "mem_mhz"):
        out[f"{key}_median"] = med(key)
    for key in ("util_gpu_pct", "util_mem_pct", "temp_c"):
        out[f"{key}_median"] = med(key)
    inst = sorted(col("power_instant_w"))
    if inst:
        out["power_instant_w_p5"] = inst[int(0.05 * (len(inst) - 1))]
        out["power_instant_w_p95"] = inst[int(0.95 * (len(inst) - 1))]
        out["power_instant_w_max"] = inst[-1]
    avg = col("power_avg_w")
    if avg:
        out["power_avg_w_max"] = max(avg)
    sm = col("sm_mhz")
    if sm:
        out["sm_mhz_min_max"] = [min(sm), max(sm)]
    reasons = [r["reasons"] for r in win if r["reasons"] is not None]
    if reasons:
        out["reason_share"] = {
            name: sum(1 for v in reasons if v & bit) / len(reasons)
            for name, bit in REASON_BITS.items()
            if any(v & bit for v in reasons)
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--period-s", type=float, default=0.05)
    p.add_argument("--warm-s", type=float, default=2.5, help="unmeasured start of each phase")
    p.add_argument("--measure-s", type=float, default=6.0)
    p.add_argument("--idle-s", type=float, default=5.0)
    p.add_argument("--dim", type=int, default=8192, help="weight matrices are dim x dim")
    p.add_argument("--layers", type=int, default=48, help="weight matrices per step")
    p.add_argument(
        "--batches",
        default="1,4,16,32,64,96,128,192,256,384,512,768,1024,2048",
        help="decode batch sizes",
    )
    p.add_argument("--duty", default="64:0.0005,64:0.002,64:0.005,8:0.002,256:0.002")
    p.add_argument("--matmuls", default="2048,4096,8192")
    p.add_argument(
        "--suite",
        choices=("sweep", "llama8b", "mixtral"),
        default="sweep",
        help="sweep: weight streaming, duty cycles, matmuls (run3); llama8b: a Llama-8B-shaped "
        "decode step at --llama-batches, back to back and with host gaps (--llama-duty); "
        "mixtral: a Mixtral-8x7B-shaped decode step (TP=1) at --mixtral-batches",
    )
    p.add_argument("--mixtral-batches", default="1,4,16,64,256")
    p.add_argument("--llama-batches", default="1,8,32,64,128,256")
    p.add_argument("--llama-ctx", type=int, default=1024)
    p.add_argument("--llama-duty", default="1:0.001,64:0.001,64:0.003")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python3 tools/gpu_measure.py " + " ".join(sys.argv[1:] if argv is None else argv)

    import pynvml

    blocked = guard_nvml(pynvml)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    before = device_facts(pynvml, h)
    print("device:", json.dumps(before), flush=True)
    sampler = Sampler(pynvml, h, args.period_s)
    sampler.start()
    phases: list[dict[str, Any]] = []

    def mark(name: str, kind: str, work: dict[str, Any], **param: Any) -> None:
        s = summarise(sampler.rows, work["t0"], work["t1"])
        phases.append({"phase": name, "kind": kind, **param, "work": work, "nvml": s})
        w = work
        print(
            f"{name:>22}  {s.get('power_counter_w', float('nan')):6.1f} W "
            f"(avg {s.get('power_avg_w_median') or float('nan'):6.1f}, inst p95 "
            f"{s.get('power_instant_w_p95') or float('nan'):6.1f})  "
            f"SM {s.get('sm_mhz_median') or 0:5.0f}  mem {s.get('mem_mhz_median') or 0:5.0f}  "
            f"{w.get('hbm_tb_per_s', 0):5.2f} TB/s  {w.get('tflop_per_s', 0):6.1f} TFLOP/s  "
            f"cap {s.get('reason_share', {}).get('sw_power_cap', 0):.2f}  "
            f"T {s.get('temp_c_median') or 0:.0f}C",
            flush=True,
        )

    t0 = time.monotonic()
    time.sleep(args.idle_s)
    mark("idle_no_context", "idle", {"t0": t0 + 1.0, "t1": time.monotonic()})

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    load = Load(torch, args.dim, args.dim, args.layers if args.suite == "sweep" else 0)
    if args.suite == "mixtral":
        mix = MixtralDecode(torch)
        t0 = time.monotonic()
        time.sleep(args.idle_s)
        mark("idle_weights_loaded", "idle", {"t0": t0 + 1.0, "t1": time.monotonic()})
    t0 = time.monotonic()
    time.sleep(args.idle_s)
    mark("idle_context", "idle", {"t0": t0 + 1.0, "t1": time.monotonic()})

    def guarded(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as err:  # one failed point must not lose the others
            print(f"{name}: FAILED {err!r}", flush=True)
            phases.append({"phase": name, "error": repr(err)})
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the next point's KV cache may need the room

    if args.suite == "mixtral":
        for b in [int(x) for x in args.mixtral_batches.split(",") if x]:

            def do_mixtral(b: int = b) -> None:
                body, nb, f, info = mix.step(b, args.llama_ctx)
                work = load.run_graphed(body, nb, f, args.warm_s, args.measure_s)
                mark(f"mixtral_b{b}", "mixtral", {**work, **info}, batch=b, ctx=args.llama_ctx)

            guarded(f"mixtral_b{b}", do_mixtral)
    elif args.suite == "llama8b":
        model = Llama8bDecode(torch)
        for b in [int(x) for x in args.llama_batches.split(",") if x]:

            def do_llama(b: int = b) -> None:
                body, nb, f = model.step(b, args.llama_ctx)
                work = load.run_graphed(body, nb, f, args.warm_s, args.measure_s)
                mark(f"llama8b_b{b}", "llama8b", work, batch=b, ctx=args.llama_ctx)

            guarded(f"llama8b_b{b}", do_llama)
        for spec in [x for x in args.llama_duty.split(",") if x]:
            b_s, gap_s = spec.split(":")

            def do_llama_duty(b: int = int(b_s), gap: float = float(gap_s)) -> None:
                body, nb, f = model.step(b, args.llama_ctx)
                work = load.run_duty(body, nb, f, gap, args.warm_s, args.measure_s)
                name = f"llama8b_b{b}_gap{gap * 1e3:g}ms"
                mark(name, "llama8b_duty", work, batch=b, ctx=args.llama_ctx, gap_s=gap)

            guarded(f"llama8b_duty_{spec}", do_llama_duty)
    else:

        def do_copy() -> None:
            body, b, f = load.copy_body(2.0)
            mark("copy_2gib", "copy", load.run_graphed(body, b, f, args.warm_s, args.measure_s))

        guarded("copy", do_copy)
        for b in [int(x) for x in args.batches.split(",") if x]:

            def do_stream(b: int = b) -> None:
                body, nb, f = load.stream_step(b)
                work = load.run_graphed(body, nb, f, args.warm_s, args.measure_s)
                mark(f"stream_b{b}", "stream", work, batch=b)

            guarded(f"stream_b{b}", do_stream)
        for spec in [x for x in args.duty.split(",") if x]:
            b_s, gap_s = spec.split(":")

            def do_duty(b: int = int(b_s), gap: float = float(gap_s)) -> None:
                body, nb, f = load.stream_step(b)
                work = load.run_duty(body, nb, f, gap, args.warm_s, args.measure_s)
                mark(f"duty_b{b}_gap{gap * 1e3:g}ms", "duty", work, batch=b, gap_s=gap)

            guarded(f"duty_{spec}", do_duty)
        for size in [int(x) for x in args.matmuls.split(",") if x]:

            def do_mm(size: int = size) -> None:
                body, nb, f = load.matmul_body(size)
                work = load.run_graphed(body, nb, f, args.warm_s, args.measure_s)
                mark(f"matmul_{size}", "matmul", work, size=size)

            guarded(f"matmul_{size}", do_mm)

        def do_repeat() -> None:
            body, nb, f = load.stream_step(64)
            mark(
                "stream_b64_again",
                "stream",
                load.run_graphed(body, nb, f, 1.0, args.measure_s),
                batch=64,
            )

        guarded("stream_b64_again", do_repeat)
    t_last = time.monotonic()
    time.sleep(args.idle_s + 3.0)
    mark("idle_after", "idle", {"t0": t_last, "t1": time.monotonic()})
    sampler.stop.set()
    sampler.join()
    after = device_facts(pynvml, h)
    pynvml.nvmlShutdown()

    keys = list(sampler.rows[0].keys()) if sampler.rows else []
    with (args.out / "samples.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(sampler.rows)
    result = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nvidia_ml_py": getattr(pynvml, "__version__", "?"),
        "device_before": before,
        "device_after": after,
        "limit_unchanged": before["power_limit_w"] == after["power_limit_w"],
        "setters_blocked": len(blocked),
        "sampler_errors": sampler.errors,
        "suite": args.suite,
        "shape": {"dim": args.dim, "layers": args.layers, "weight_bytes": load.weight_bytes},
        "phases": phases,
    }
    (args.out / "measure.json").write_text(json.dumps(result, indent=1))
    print(
        f"limit before {before['power_limit_w']} W, after {after['power_limit_w']} W; "
        f"{len(blocked)} setters blocked; sampler errors {sampler.errors}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
