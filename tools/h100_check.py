#!/usr/bin/env python3
"""Read-only check of palsd's NVML backend on a real GPU under a stepped load (issue #7).

What it does, in one process that never changes the GPU:
- wraps every mutating pynvml function (Set*, Reset*, Clear*, ...) so that a call is counted
  and raises, and wraps every other one to time it (the latency of each NVML call palsd makes);
- starts a load worker subprocess (PyTorch: idle, a memory-bound MoE-like decode loop at several
  batch sizes, bf16 matrix products at several sizes, then down again) that marks each phase;
- optionally starts the palsd daemon itself (`palsd run`, dry run, NVML backend) beside it,
  with the same setter guard installed in that process, and keeps its log;
- every --period-s reads palsd's telemetry through NvmlBackend and runs the controllers on it
  under each budget (dry run: the would-be limits are recorded, never applied);
- checks: energy from integrating instant power agrees with the energy counter per phase within
  5%; every would-be decision sits within the NVML constraints and sums within the budget; no
  setter was called; the power limit read at the end equals the one read at the start.
It prints a summary table last and writes h100_check.json (+ samples CSV, daemon log) to --out.

Run on a GPU host:  python3 tools/h100_check.py --out "$OUT"
Without a GPU:      python3 tools/h100_check.py --fake --phase-s 0.6 --out /tmp/h100
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pynvml

import palsd.sense.nvml as nvml_mod
from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    Controller,
    Decision,
    GpuObservation,
    Observation,
)
from palsd.sense.nvml import NvmlBackend

ENERGY_TOLERANCE = 0.05
MUTATING = re.compile(r"^nvml(?!EventSet)\w*?(Set|Reset|Clear|Create|Destroy|Modify|Remove)")

# (name, kind, parameter): kind nocontext | idle | decode (batch size) | matmul (matrix size).
SCHEDULE: list[tuple[str, str, int]] = [
    ("idle_no_context", "nocontext", 0),  # before the load opens a CUDA context: clocks drop
    ("idle", "idle", 0),
    ("decode_b1", "decode", 1),
    ("decode_b16", "decode", 16),
    ("decode_b64", "decode", 64),
    ("decode_b256", "decode", 256),
    ("matmul_2048", "matmul", 2048),
    ("matmul_4096", "matmul", 4096),
    ("matmul_8192", "matmul", 8192),
    ("decode_b64_down", "decode", 64),
    ("idle_end", "idle", 0),
]


# -- guards and timers on pynvml ------------------------------------------------------------


class SetterCalled(RuntimeError):
    """Not an NVMLError on purpose: no `except NVMLError` in palsd may swallow it."""


class NvmlInstruments:
    """Replaces pynvml's functions in `module`: setters raise and are counted, getters timed."""

    def __init__(self, module: Any, log_path: Path | None = None) -> None:
        self.module = module
        self.log_path = log_path
        self.setter_calls: list[str] = []
        self.latency_s: dict[str, list[float]] = {}
        self.last_mid_s: dict[tuple[str, int], float] = {}  # (function, id(handle)) -> time

    def install(self) -> None:
        for name in dir(self.module):
            fn = getattr(self.module, name)
            if not name.startswith("nvml") or not callable(fn) or isinstance(fn, type):
                continue
            if MUTATING.match(name):
                setattr(self.module, name, self._blocked(name))
            else:
                setattr(self.module, name, self._timed(name, fn))

    def _blocked(self, name: str) -> Callable[..., Any]:
        def blocked(*_args: Any, **_kwargs: Any) -> Any:
            self.setter_calls.append(name)
            if self.log_path is not None:
                with self.log_path.open("a") as f:
                    f.write(name + "\n")
            raise SetterCalled(f"{name} was called during a read-only check")

        return blocked

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        samples = self.latency_s.setdefault(name, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                samples.append(t1 - t0)
                self.last_mid_s[(name, id(args[0]) if args else 0)] = (
                    time.monotonic() - (t1 - t0) / 2
                )

        return timed


def quantiles_us(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": p99 * 1e6,
        "max_us": ordered[-1] * 1e6,
    }


# -- analysis (pure) --------------------------------------------------------------------------


def integrate_j(ts: Sequence[float], ps: Sequence[float], a: float, b: float) -> float:
    """Trapezoid integral of the piecewise-linear series (ts, ps) over [a, b]."""
    pts = [(t, p) for t, p in zip(ts, ps, strict=True) if a < t < b]

    def at(x: float) -> float:
        if x <= ts[0]:
            return ps[0]
        if x >= ts[-1]:
            return ps[-1]
        for i in range(1, len(ts)):
            if ts[i] >= x:
                w = (x - ts[i - 1]) / (ts[i] - ts[i - 1]) if ts[i] > ts[i - 1] else 1.0
                return ps[i - 1] + w * (ps[i] - ps[i - 1])
        return ps[-1]

    pts = [(a, at(a)), *pts, (b, at(b))]
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(pts))


def check_decision(d: Decision, gpus: Sequence[GpuObservation], budget_w: float) -> list[str]:
    problems = []
    for g in gpus:
        limit = d.power_limits_w.get(g.index)
        if limit is None:
            continue
        if not g.min_limit_w - 1e-9 <= limit <= g.max_limit_w + 1e-9:
            problems.append(
                f"GPU {g.index} limit {limit} outside [{g.min_limit_w}, {g.max_limit_w}]"
            )
    total = sum(d.power_limits_w.values())
    if not d.infeasible and total > budget_w + 1e-6:
        problems.append(f"sum {total:.3f} W above budget {budget_w} W")
    return problems


REASON_BITS = {
    "GpuIdle": 0x1,
    "AppClocks": 0x2,
    "SwPowerCap": 0x4,
    "HwSlowdown": 0x8,
    "SyncBoost": 0x10,
    "SwThermal": 0x20,
    "HwThermal": 0x40,
    "HwPowerBrake": 0x80,
}


def reasons_share(values: Sequence[int | None]) -> dict[str, float]:
    seen = [v for v in values if v is not None]
    if not seen:
        return {}
    out = {name: sum(1 for v in seen if v & bit) / len(seen) for name, bit in REASON_BITS.items()}
    return {k: round(v, 3) for k, v in out.items() if v > 0}


# -- the load (runs in its own process so the sampler's timings see no GIL contention) ------


def run_load_worker(
    schedule: list[tuple[str, str, int]], phase_s: float, marks: Path, tiny: bool = False
) -> None:
    """`tiny`: small shapes on the CPU, so the worker's code can be tried without a GPU."""
    import torch

    def emit(record: dict[str, Any]) -> None:
        with marks.open("a") as f:
            f.write(json.dumps(record) + "\n")

    for name, kind, param in schedule:  # before any CUDA call: the GPU as nobody uses it
        if kind == "nocontext":
            start = time.monotonic()
            time.sleep(phase_s)
            emit(
                {
                    "event": "phase",
                    "phase": name,
                    "kind": kind,
                    "param": param,
                    "start_s": start,
                    "end_s": time.monotonic(),
                    "work": {},
                }
            )
    dev = torch.device("cpu" if tiny else "cuda:0")
    torch.manual_seed(0)
    hidden, ffn, experts, layers = 4096, 14336, 8, 4  # Mixtral-8x7B expert shapes, 4 layers
    if tiny:
        hidden, ffn = 256, 512

    def no_sync() -> None:
        pass

    sync: Callable[[], None] = no_sync if tiny else torch.cuda.synchronize

    w1 = [torch.randn(experts, hidden, ffn, device=dev, dtype=torch.bfloat16) * 0.02]
    w3 = [torch.randn(experts, hidden, ffn, device=dev, dtype=torch.bfloat16) * 0.02]
    w2 = [torch.randn(experts, ffn, hidden, device=dev, dtype=torch.bfloat16) * 0.02]
    for _ in range(layers - 1):  # distinct weights per layer: each step reads them all
        w1.append(torch.randn_like(w1[0]) * 0.02)
        w3.append(torch.randn_like(w3[0]) * 0.02)
        w2.append(torch.randn_like(w2[0]) * 0.02)
    router = torch.randn(layers, hidden, experts, device=dev, dtype=torch.bfloat16) * 0.02
    mats: dict[int, tuple[Any, Any]] = {}

    def decode_step(x: Any) -> Any:
        for layer in range(layers):
            weights, chosen = torch.topk(torch.softmax(x @ router[layer], -1), 2, dim=-1)
            out = torch.zeros_like(x)
            for e in range(experts):
                rows, slot = torch.where(chosen == e)
                if rows.numel() == 0:
                    continue
                xe = x[rows]
                h = torch.nn.functional.silu(xe @ w1[layer][e]) * (xe @ w3[layer][e])
                out.index_add_(0, rows, (h @ w2[layer][e]) * weights[rows, slot, None])
            x = x + out
        return x

    for _ in range(3):  # warm cuBLAS handles and the allocator out of the measured phases
        decode_step(torch.randn(16, hidden, device=dev, dtype=torch.bfloat16))
    sync()
    emit({"event": "ready", "t_s": time.monotonic()})
    for name, kind, param in schedule:
        if kind == "nocontext":
            continue
        x = torch.randn(max(param, 1), hidden, device=dev, dtype=torch.bfloat16)
        n = max(64, param // 32) if tiny else param
        if kind == "matmul" and n not in mats:
            mats[n] = (
                torch.randn(n, n, device=dev, dtype=torch.bfloat16),
                torch.randn(n, n, device=dev, dtype=torch.bfloat16),
            )
        # about 20 ms of matrix work between host syncs at 600 TFLOP/s (1.2e13 FLOP)
        chunk = 1 if kind != "matmul" or tiny else min(2000, max(1, round(1.2e13 / (2 * n**3))))
        sync()
        start = time.monotonic()
        steps = 0
        while time.monotonic() - start < phase_s:
            if kind == "idle":
                time.sleep(0.05)
                continue
            if kind == "decode":
                x = decode_step(x)
                x = x / (x.norm(dim=-1, keepdim=True) + 1e-3)  # keep values finite
            else:
                a, b = mats[n]
                for _ in range(chunk):
                    torch.matmul(a, b)
                sync()
            steps += chunk
        sync()
        end = time.monotonic()
        work: dict[str, float] = {"steps": steps}
        if kind == "decode":
            work["tokens_per_s"] = steps * param / (end - start)
        elif kind == "matmul":
            work["tflop_per_s"] = steps * 2 * n**3 / (end - start) / 1e12
        emit(
            {
                "event": "phase",
                "phase": name,
                "kind": kind,
                "param": param,
                "start_s": start,
                "end_s": end,
                "work": work,
            }
        )
    emit({"event": "done", "t_s": time.monotonic()})


# -- a fake NVML for a dry run of this script without a GPU ----------------------------------


class FakeGpuPower:
    """Power as a function of the phase the fake load is in; the energy counter integrates
    exactly what the instant field reports around (the check must then pass)."""

    def __init__(self) -> None:
        self.power_w = 75.0
        self.since_s = time.monotonic()
        self.energy_j = 1.0e8
        self.lock = threading.Lock()

    def set(self, power_w: float) -> None:
        with self.lock:
            now = time.monotonic()
            self.energy_j += self.power_w * (now - self.since_s)
            self.power_w, self.since_s = power_w, now

    def energy_mj(self) -> int:
        with self.lock:
            return int(1000 * (self.energy_j + self.power_w * (time.monotonic() - self.since_s)))


def fake_power_w(kind: str, param: int) -> float:
    if kind == "decode":
        return 180.0 + 15.0 * param.bit_length()
    if kind == "matmul":
        return min(700.0, 250.0 + 450.0 * (param / 8192) ** 1.5)
    return 75.0


def make_fake_nvml(meter: FakeGpuPower) -> Any:
    from types import SimpleNamespace
    from unittest import mock

    fake = mock.create_autospec(pynvml)
    for name in dir(pynvml):
        value = getattr(pynvml, name)
        if isinstance(value, type) or not callable(value):
            setattr(fake, name, value)

    def field(_h: Any, ids: list[int]) -> list[Any]:
        out = []
        for _ in ids:
            f = pynvml.c_nvmlFieldValue_t()
            f.nvmlReturn = pynvml.NVML_SUCCESS
            f.value.uiVal = int(meter.power_w * 1000)
            out.append(f)
        return out

    handle = SimpleNamespace(index=0)
    fake.nvmlDeviceGetCount.return_value = 1
    fake.nvmlDeviceGetHandleByIndex.return_value = handle
    fake.nvmlDeviceGetName.return_value = "NVIDIA H100 80GB HBM3 (fake)"
    fake.nvmlDeviceGetUUID.return_value = "GPU-fake-0000"
    fake.nvmlSystemGetDriverVersion.return_value = "fake"
    fake.nvmlDeviceGetPowerManagementLimitConstraints.return_value = [200_000, 700_000]
    fake.nvmlDeviceGetPowerManagementDefaultLimit.return_value = 700_000
    fake.nvmlDeviceGetPowerManagementLimit.return_value = 700_000
    fake.nvmlDeviceGetEnforcedPowerLimit.return_value = 700_000
    fake.nvmlDeviceGetPowerUsage.side_effect = lambda h: int(meter.power_w * 1000)
    fake.nvmlDeviceGetFieldValues.side_effect = field
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = lambda h: meter.energy_mj()
    fake.nvmlDeviceGetClockInfo.return_value = 1980
    fake.nvmlDeviceGetCurrentClocksEventReasons.side_effect = lambda h: (
        0x4 if meter.power_w >= 690 else 0x1 if meter.power_w < 100 else 0
    )
    return fake


def run_fake_load(
    schedule: list[tuple[str, str, int]], phase_s: float, marks: Path, meter: FakeGpuPower
) -> None:
    def emit(record: dict[str, Any]) -> None:
        with marks.open("a") as f:
            f.write(json.dumps(record) + "\n")

    emit({"event": "ready", "t_s": time.monotonic()})
    for name, kind, param in schedule:
        meter.set(fake_power_w(kind, param))
        start = time.monotonic()
        time.sleep(phase_s)
        emit(
            {
                "event": "phase",
                "phase": name,
                "kind": kind,
                "param": param,
                "start_s": start,
                "end_s": time.monotonic(),
                "work": {},
            }
        )
    meter.set(75.0)
    emit({"event": "done", "t_s": time.monotonic()})


# -- the sampler: palsd's sense and decide steps on real NVML, nothing applied ---------------


def make_controllers() -> dict[str, Callable[[], Controller]]:
    from palsd.core.demand_split import DemandSplitController

    makers: dict[str, Callable[[], Controller]] = {"demand_split": DemandSplitController}
    try:
        from palsd.core.controller import JointController

        makers["joint"] = JointController
    except ImportError:  # not written yet on this checkout
        pass
    return makers


def sample_loop(
    backend: NvmlBackend,
    inst: NvmlInstruments,
    budgets_per_gpu_w: Sequence[float],
    period_s: float,
    until: Callable[[], bool],
) -> tuple[list[dict[str, Any]], dict[str, list[float]], list[str]]:
    """Read, decide under every budget, record. Returns samples, tick timings, problems."""
    makers = make_controllers()
    controllers = {(c, b): make() for c, make in makers.items() for b in budgets_per_gpu_w}
    handles = {id(h): i for i, h in backend._handles.items()}
    timings: dict[str, list[float]] = {"read_all": [], "clock_event_reasons": [], "tick": []}
    problems: list[str] = []
    samples: list[dict[str, Any]] = []
    next_t = time.monotonic()
    while not until():
        t0 = time.perf_counter()
        gpus = backend.read_all()
        t1 = time.perf_counter()
        reasons = {g.index: backend.clock_event_reasons(g.index) for g in gpus}
        t2 = time.perf_counter()
        now = time.monotonic()
        decisions: dict[str, dict[str, float]] = {}
        for (cname, per_gpu_w), ctl in controllers.items():
            budget_w = per_gpu_w * len(gpus)
            obs = Observation(
                now_s=now,
                gpus=tuple(gpus),
                servers=(),
                budget=BudgetInForce(budget_w, BudgetSource.DEFAULT, reason="h100_check"),
            )
            td = time.perf_counter()
            try:
                d = ctl.decide(obs)
            except Exception as err:  # a controller bug must not hide the telemetry
                problems.append(f"{cname}@{per_gpu_w:g}: decide raised {err!r}")
                continue
            timings.setdefault(f"decide_{cname}", []).append(time.perf_counter() - td)
            for p in check_decision(d, gpus, budget_w):
                problems.append(f"{cname}@{per_gpu_w:g}: {p}")
            decisions[f"{cname}@{per_gpu_w:g}"] = {str(k): v for k, v in d.power_limits_w.items()}
        t3 = time.perf_counter()
        timings["read_all"].append(t1 - t0)
        timings["clock_event_reasons"].append(t2 - t1)
        timings["tick"].append(t3 - t0)
        mids = {(name, handles.get(h)): t for (name, h), t in inst.last_mid_s.items()}
        for g in gpus:
            samples.append(
                {
                    "t_s": now,
                    "gpu": g.index,
                    "t_instant_s": mids.get(("nvmlDeviceGetFieldValues", g.index), now),
                    "t_energy_s": mids.get(("nvmlDeviceGetTotalEnergyConsumption", g.index), now),
                    "power_w": g.power_w,
                    "power_instant_w": g.power_instant_w,
                    "energy_j": g.energy_j,
                    "power_limit_w": g.power_limit_w,
                    "enforced_limit_w": g.enforced_limit_w,
                    "min_limit_w": g.min_limit_w,
                    "max_limit_w": g.max_limit_w,
                    "sm_clock_mhz": g.sm_clock_mhz,
                    "clock_event_reasons": reasons[g.index],
                    "would_be_w": {k: v.get(str(g.index)) for k, v in decisions.items()},
                }
            )
        next_t += period_s
        time.sleep(max(0.0, next_t - time.monotonic()))
    return samples, timings, problems


def phase_report(samples: list[dict[str, Any]], phase: dict[str, Any], gpu: int) -> dict[str, Any]:
    rows = [
        s for s in samples if s["gpu"] == gpu and phase["start_s"] <= s["t_s"] <= phase["end_s"]
    ]
    out: dict[str, Any] = {
        "phase": phase["phase"],
        "start_s": phase["start_s"],
        "end_s": phase["end_s"],
        "gpu": gpu,
        "samples": len(rows),
        "duration_s": phase["end_s"] - phase["start_s"],
        **phase["work"],
    }
    inst = [r for r in rows if r["power_instant_w"] is not None]
    energy = [r for r in rows if r["energy_j"] is not None]
    if len(inst) >= 3 and len(energy) >= 2:
        a, b = energy[0], energy[-1]
        counter_j = b["energy_j"] - a["energy_j"]
        window_s = b["t_energy_s"] - a["t_energy_s"]
        ts = [r["t_instant_s"] for r in inst]
        ps = [r["power_instant_w"] for r in inst]
        inst_j = integrate_j(ts, ps, a["t_energy_s"], b["t_energy_s"])
        out.update(
            energy_counter_j=counter_j,
            energy_instant_j=inst_j,
            energy_rel_err=(inst_j - counter_j) / counter_j if counter_j > 0 else None,
            power_counter_w=counter_j / window_s if window_s > 0 else None,
        )
    for key in ("power_w", "power_instant_w", "sm_clock_mhz", "enforced_limit_w"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[f"{key}_median"] = statistics.median(vals) if vals else None
    out["instant_w_min_max"] = [min(ps), max(ps)] if inst else None
    out["clock_event_reasons_share"] = reasons_share([r["clock_event_reasons"] for r in rows])
    would: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r["would_be_w"].items():
            if v is not None:
                would.setdefault(k, []).append(v)
    out["would_be_w_median"] = {k: statistics.median(v) for k, v in would.items()}
    return out


# -- the daemon itself, dry run, beside the sampler -------------------------------------------


def daemon_config(work: Path, indices: list[int] | None, budget_w: float) -> Path:
    import yaml

    cfg: dict[str, Any] = {
        "control": {"period_s": 0.5, "dry_run": True, "controller": "demand_split"},
        "gpu": {"backend": "nvml", **({"indices": indices} if indices is not None else {})},
        "budget": {"default_w": budget_w},
        "api": {"socket": str(work / "palsd.sock"), "admin_group": None},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "state": {"dir": str(work / "state")},
        "logging": {"level": "info", "format": "json"},
    }
    path = work / "palsd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def daemon_shim(argv: list[str], guard_log: Path, fake: bool) -> int:
    """Runs `palsd` with the setter guard installed in its own process (and, with --fake, an
    idle fake NVML in place of the real one)."""
    module: Any = pynvml
    if fake:
        meter = FakeGpuPower()
        module = make_fake_nvml(meter)
        sys.modules["pynvml"] = module
        nvml_mod.pynvml = module
    NvmlInstruments(module, guard_log).install()
    from palsd.cli.palsd import main as palsd_main

    return palsd_main(argv)


def scrape_daemon_metrics(log_path: Path) -> dict[str, float] | str:
    """palsd's own tick histogram and counters, read from its Prometheus endpoint."""
    import urllib.request

    port = None
    for line in log_path.read_text(errors="replace").splitlines():
        if '"metrics_listening"' in line:
            port = json.loads(line).get("port")
    if port is None:
        return "no metrics_listening line in the daemon log"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as err:
        return f"scrape failed: {err}"
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split(" ")[0]
        if line.startswith(("palsd_tick", "palsd_limit_writes", "palsd_sense_errors")) and (
            not name.endswith("_created")
        ):
            try:
                out[name] = float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return out


def summarize_daemon_log(path: Path, budget_w: float) -> dict[str, Any]:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    events: dict[str, int] = {}
    would: list[float] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = str(rec.get("event"))
        events[ev] = events.get(ev, 0) + 1
        if ev == "would_set_power_limit":
            would.append(float(rec["limit_w"]))
    return {
        "log_lines": len(lines),
        "events": events,
        "would_set_count": len(would),
        "would_set_w_min_max": [min(would), max(would)] if would else None,
        "would_set_above_budget": sum(1 for w in would if w > budget_w + 1e-6),
    }


# -- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/h100_check")))
    ap.add_argument("--fake", action="store_true", help="fake NVML and load: no GPU needed")
    ap.add_argument("--phase-s", type=float, default=8.0, help="length of each load phase")
    ap.add_argument("--period-s", type=float, default=0.1, help="sampling / tick period")
    ap.add_argument("--budgets-w", default="700,400,250", help="budgets per GPU, watts")
    ap.add_argument("--gpus", default="all", help="NVML indices to read, e.g. 0,1 or all")
    ap.add_argument(
        "--daemon",
        choices=["auto", "on", "off"],
        default="auto",
        help="also run `palsd run` in dry run beside the sampler",
    )
    ap.add_argument("--daemon-budget-w", type=float, default=400.0, help="per GPU")
    ap.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--marks", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--daemon-shim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--guard-log", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--twin-compare",
        type=Path,
        metavar="SUMMARY_JSON",
        help="print a summary's phases beside palsd.sim's H100 and exit",
    )
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def read_marks(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_daemon(
    args: argparse.Namespace, work: Path, indices: list[int] | None, n_gpus: int
) -> tuple[subprocess.Popen[bytes] | None, Path]:
    guard_log = work / "guard_daemon.log"
    import importlib.util

    if args.daemon == "off" or (
        args.daemon == "auto" and importlib.util.find_spec("palsd.runtime.run_cli") is None
    ):
        return None, guard_log
    cfg = daemon_config(work, indices, args.daemon_budget_w * n_gpus)
    cmd = [sys.executable, __file__, "--daemon-shim", "--guard-log", str(guard_log)]
    cmd += ["--fake"] if args.fake else []
    cmd += ["--", "run", "--config", str(cfg)]
    log = (args.out / "daemon.log").open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), guard_log


def stop_process(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_check(args: argparse.Namespace) -> int:
    import tempfile

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="h100_check_"))
    marks = work / "marks.jsonl"
    budgets = [float(b) for b in args.budgets_w.split(",")]
    indices = None if args.gpus == "all" else [int(i) for i in args.gpus.split(",")]
    module: Any = pynvml
    meter = FakeGpuPower()
    if args.fake:
        module = make_fake_nvml(meter)
        nvml_mod.pynvml = module
    inst = NvmlInstruments(module, work / "guard_main.log")
    inst.install()
    backend = NvmlBackend(indices)
    backend.start()
    before = backend.read_all()
    facts: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "fake": args.fake}
    for key, fn in (("driver", "nvmlSystemGetDriverVersion"), ("nvml", "nvmlSystemGetNVMLVersion")):
        try:
            facts[key] = str(getattr(module, fn)())
        except Exception as err:  # informative only
            facts[key] = f"unread: {err}"
    try:
        from importlib.metadata import version

        facts["nvidia_ml_py"] = version("nvidia-ml-py")
    except Exception as err:  # informative only
        facts["nvidia_ml_py"] = f"unknown: {err}"
    facts["python"] = sys.version.split()[0]
    facts["gpus"] = [
        {
            "index": g.index,
            "name": g.name,
            "uuid": g.uuid,
            "min_limit_w": g.min_limit_w,
            "max_limit_w": g.max_limit_w,
            "default_limit_w": g.default_limit_w,
            "power_limit_w": g.power_limit_w,
            "enforced_limit_w": g.enforced_limit_w,
        }
        for g in before
    ]
    daemon, guard_daemon = start_daemon(args, work, indices, len(before))
    load_log = (args.out / "load.log").open("wb")
    worker: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    if args.fake:
        thread = threading.Thread(
            target=run_fake_load, args=(SCHEDULE, args.phase_s, marks, meter), daemon=True
        )
        thread.start()
    else:
        cmd = [
            sys.executable,
            __file__,
            "--load-worker",
            "--marks",
            str(marks),
            "--phase-s",
            str(args.phase_s),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        worker = subprocess.Popen(cmd, stdout=load_log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + len(SCHEDULE) * args.phase_s + 240

    def finished() -> bool:
        if time.monotonic() > deadline:
            return True
        if worker is not None:
            return worker.poll() is not None
        return thread is not None and not thread.is_alive()

    samples, timings, problems = sample_loop(backend, inst, budgets, args.period_s, finished)
    worker_rc = stop_process(worker)
    daemon_metrics = scrape_daemon_metrics(args.out / "daemon.log") if daemon else None
    daemon_rc = stop_process(daemon)
    after = backend.read_all()
    backend.close()

    phases = [m for m in read_marks(marks) if m.get("event") == "phase"]
    reports = [phase_report(samples, p, g.index) for p in phases for g in before]
    errs = [r.get("energy_rel_err") for r in reports]
    energy_ok = bool(reports) and all(e is not None and abs(e) <= ENERGY_TOLERANCE for e in errs)
    guard_daemon_calls = guard_daemon.read_text().split() if guard_daemon.exists() else []
    daemon_summary = (
        summarize_daemon_log(args.out / "daemon.log", args.daemon_budget_w * len(before))
        if daemon is not None
        else None
    )
    checks = {
        "all_phases_ran": len(phases) == len(SCHEDULE),
        "energy_within_5pct_every_phase": energy_ok,
        "decisions_within_constraints_and_budget": not problems,
        "no_setter_called_sampler": not inst.setter_calls,
        "no_setter_called_daemon": not guard_daemon_calls,
        "limits_unchanged": [g.power_limit_w for g in before] == [g.power_limit_w for g in after],
    }
    if daemon_summary is not None:
        checks["daemon_logged_would_be_limits"] = daemon_summary["would_set_count"] > 0
        checks["daemon_would_be_within_budget"] = daemon_summary["would_set_above_budget"] == 0
    latency = {name: quantiles_us(v) for name, v in sorted(inst.latency_s.items()) if v}
    summary = {
        "facts": facts,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "period_s": args.period_s,
        "phase_s": args.phase_s,
        "budgets_per_gpu_w": budgets,
        "checks": checks,
        "phases": reports,
        "nvml_call_latency": latency,
        "tick_latency": {k: quantiles_us(v) for k, v in timings.items()},
        "decision_problems": problems[:50],
        "setter_calls": inst.setter_calls + guard_daemon_calls,
        "worker_rc": worker_rc,
        "daemon": (
            {"rc": daemon_rc, "metrics": daemon_metrics, **(daemon_summary or {})}
            if daemon is not None
            else None
        ),
        "samples": len(samples),
    }
    (args.out / "h100_check.json").write_text(json.dumps(summary, indent=1, default=str))
    write_samples_csv(args.out / "h100_samples.csv", samples)
    print_summary(summary)
    return 0 if all(checks.values()) else 1


def write_samples_csv(path: Path, samples: list[dict[str, Any]]) -> None:
    keys = [k for k in (samples[0] if samples else {}) if k != "would_be_w"]
    would = sorted({k for s in samples for k in s["would_be_w"]})
    with path.open("w") as f:
        f.write(",".join(keys + [f"would_{k}" for k in would]) + "\n")
        for s in samples:
            row = [s[k] for k in keys] + [s["would_be_w"].get(k) for k in would]
            f.write(",".join("" if v is None else f"{v}" for v in row) + "\n")


def fmt(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_summary(s: dict[str, Any]) -> None:
    f = s["facts"]
    print(
        f"\n== h100_check {f['date']}  driver {f['driver']}  "
        f"{', '.join(g['name'] for g in f['gpus'])}"
    )
    print(
        f"{'phase':<16}{'gpu':>4}{'n':>5}{'P_ctr W':>9}{'P_inst':>8}{'P_avg':>7}"
        f"{'E_err%':>8}{'SM MHz':>8}{'work':>10}  reasons; would-be W"
    )
    for r in s["phases"]:
        work = r.get("tokens_per_s") or r.get("tflop_per_s")
        err = r.get("energy_rel_err")
        would = " ".join(f"{k}={v:.0f}" for k, v in r["would_be_w_median"].items())
        reasons = ",".join(f"{k}:{v:.0%}" for k, v in r["clock_event_reasons_share"].items())
        print(
            f"{r['phase']:<16}{r['gpu']:>4}{r['samples']:>5}{fmt(r.get('power_counter_w')):>9}"
            f"{fmt(r['power_instant_w_median']):>8}{fmt(r['power_w_median']):>7}"
            f"{fmt(None if err is None else 100 * err, '+.2f'):>8}"
            f"{fmt(r['sm_clock_mhz_median']):>8}{fmt(work, '.1f'):>10}  {reasons}; {would}"
        )
    print(f"\n{'NVML call':<46}{'n':>6}{'median us':>11}{'p99 us':>10}{'max us':>10}")
    for name, q in {**s["nvml_call_latency"], **s["tick_latency"]}.items():
        if q.get("n"):
            print(
                f"{name:<46}{q['n']:>6}{q['median_us']:>11.1f}{q['p99_us']:>10.1f}"
                f"{q['max_us']:>10.1f}"
            )
    if s["daemon"] is not None:
        d = s["daemon"]
        print(
            f"\ndaemon: rc {d['rc']}, {d.get('would_set_count')} would-be writes, range "
            f"{d.get('would_set_w_min_max')}, events {d.get('events')}"
        )
    print(
        "\nchecks: " + "  ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in s["checks"].items())
    )


# -- the twin beside the measurements (docs/hardware.md) --------------------------------------


def twin_compare(summary_path: Path) -> int:
    """Set each measured phase beside palsd.sim's H100 for the same load: the twin's power model
    fed with the utilisation the measured throughput implies, and the twin's iteration model
    run on this script's 4-layer MoE (tokens/s and watts it predicts on its own)."""
    from palsd.sim.gpu_model import H100
    from palsd.sim.models import ModelSpec, iteration_cost

    expert = 3 * 4096 * 14336
    micro = ModelSpec(
        name="h100_check MoE",
        total_params=4 * 8 * expert + 4 * 4096 * 8,
        layers=4,
        hidden=4096,
        heads=0,
        kv_heads=0,
        head_dim=0,
        experts=8,
        top_k=2,
        expert_params=expert,
        default_tp=1,
    )
    summary = json.loads(summary_path.read_text())
    f_max = H100.max_clock_mhz
    print(
        f"{'phase':<16}{'meas W':>8}{'MHz':>6}{'work':>9}{'twin W@meas':>12}"
        f"{'u_mem':>7}{'u_comp':>7}{'twin-only W':>12}{'twin work':>10}"
    )
    for r in summary["phases"]:
        name, meas_w, mhz = r["phase"], r.get("power_counter_w"), r.get("sm_clock_mhz_median")
        if meas_w is None:
            continue
        u_mem = u_comp = 0.0
        alone_w: float | None = None
        alone_work: float | None = None
        work = r.get("tokens_per_s") or r.get("tflop_per_s")
        if "tokens_per_s" in r:
            batch = int(name.split("_b")[1].split("_")[0])
            steps = r["tokens_per_s"] / batch
            bytes_step = micro.layers * micro.experts_touched(batch) * expert * 2
            u_mem = bytes_step * steps / H100.bw_at(f_max)
            u_comp = r["tokens_per_s"] * 2 * micro.active_params / H100.flops_at(f_max)
            c = iteration_cost(micro, H100, 1, f_max, batch, 0.0)
            alone_w = H100.busy_power_w(f_max, c.mem_s / c.time_s, c.comp_s / c.time_s)
            alone_work = batch / c.time_s
            twin_w = H100.busy_power_w(f_max, u_mem, u_comp)
        elif "tflop_per_s" in r:
            n = int(name.split("_")[1])
            u_comp = r["tflop_per_s"] * 1e12 / H100.flops_at(mhz or f_max)
            twin_w = H100.busy_power_w(mhz or f_max, 0.0, u_comp)  # at the clock the cap held
            st = H100.steady_step(3.0 * n * n * 2, 2.0 * n**3, 700.0)  # the twin's own cap loop
            alone_w = st.power_w
            alone_work = st.flops_per_s / 1e12
        else:
            twin_w = H100.idle_w(mhz or H100.idle_clock_mhz)
        print(
            f"{name:<16}{meas_w:>8.0f}{fmt(mhz):>6}{fmt(work, '.0f'):>9}{twin_w:>12.0f}"
            f"{u_mem:>7.2f}{u_comp:>7.3f}{fmt(alone_w):>12}{fmt(alone_work, '.0f'):>10}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_worker:
        run_load_worker(SCHEDULE, args.phase_s, args.marks, args.tiny)
        return 0
    if args.twin_compare:
        return twin_compare(args.twin_compare)
    if args.daemon_shim:
        return daemon_shim(args.rest, args.guard_log, args.fake)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
