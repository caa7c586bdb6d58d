"""Dry run never writes to a GPU: the daemon over NvmlBackend over an autospec'd pynvml runs
ticks and budget cuts, logs the limits it would set, and no mutating NVML function is called.

Also the belt-and-braces guard of tools/h100_check.py (which wraps pynvml's setters so that a
call raises), and `palsd run` itself as a process in dry run with that guard installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog
import yaml
from structlog.testing import capture_logs

import palsd.sense.nvml as nvml_mod
from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.demand_split import DemandSplitController
from palsd.report.metrics import Metrics
from palsd.runtime.daemon import Daemon
from palsd.sense.nvml import NvmlBackend
from tests.unit.test_nvml_backend import make_fake_pynvml, mutating_names

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "h100_check.py"
BUDGET_PER_GPU_W = 250.0


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("h100_check", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = make_fake_pynvml(n_gpus=2, power_mw=450_000)  # busy: both GPUs want more than 250 W
    monkeypatch.setattr(nvml_mod, "pynvml", fake)
    return fake


def make_dry_run_daemon(tmp_path: Path, backend: NvmlBackend, budget_w: float) -> Daemon:
    metrics = Metrics()
    log = structlog.get_logger("test")
    actuator = PowerActuator(backend, OriginalsStore(tmp_path), metrics, log, dry_run=True)
    return Daemon(
        backend=backend,
        actuator=actuator,
        controller=DemandSplitController(),
        servers=[],
        book=BudgetBook(default_w=budget_w),
        metrics=metrics,
        log=log,
        period_s=0.5,
        clock=lambda: 1000.0,
    )


def called_setters(fake: Any) -> list[str]:
    return [name for name in mutating_names() if getattr(fake, name).called]


def test_dry_run_ticks_and_budget_cuts_call_no_setter_and_log_would_be_limits(
    fake: Any, tmp_path: Path
) -> None:
    backend = NvmlBackend()
    budget_w = BUDGET_PER_GPU_W * 2
    daemon = make_dry_run_daemon(tmp_path, backend, budget_w)

    async def scenario() -> None:
        for _ in range(5):
            await daemon.tick()
        # A lower budget arriving is enforced at once, outside the tick: also dry.
        daemon.set_override(BudgetEntry(450.0, reason="test cut"))
        await daemon.enforce_cut()  # what the daemon's budget task does on arrival
        for _ in range(3):
            await daemon.tick()
        # What `palsd run` does on the way out puts back nothing: a dry run recorded nothing.
        store = OriginalsStore(tmp_path)
        await put_back(daemon.actuator.originals, store, daemon.actuator, {}, daemon.log)

    with capture_logs() as logs:
        asyncio.run(scenario())
    backend.close()

    assert called_setters(fake) == []
    assert "nvmlDeviceSetPowerManagementLimit" in mutating_names()
    assert "nvmlDeviceSetPowerManagementLimit_v2" in mutating_names()
    assert all(s["limit_mw"] == 700_000 for s in fake.state.values())  # the GPU is untouched
    would = [e for e in logs if e["event"] == "would_set_power_limit"]
    assert would, "dry run must log the limits it would set"
    assert all(e["dry_run"] is True for e in would)
    assert {e["gpu"] for e in would} == {0, 1}
    before_cut = [e["limit_w"] for e in would[:2]]
    assert before_cut == [BUDGET_PER_GPU_W, BUDGET_PER_GPU_W]
    assert would[-1]["limit_w"] == 225.0  # the cut to 450 W, split over two GPUs
    decisions = [e for e in logs if e["event"] == "decision"]
    assert len(decisions) == 8
    assert all(sum(d["power_limits_w"].values()) <= d["budget_w"] for d in decisions)
    assert daemon.status()["controller"]["dry_run"] is True


def test_guard_turns_a_setter_call_into_an_error_that_palsd_does_not_swallow(fake: Any) -> None:
    tool = load_tool()
    inst = tool.NvmlInstruments(fake)
    inst.install()
    backend = NvmlBackend(indices=[0])
    backend.read_all()
    with pytest.raises(tool.SetterCalled):
        backend.set_power_limit_w(0, 300.0)
    with pytest.raises(tool.SetterCalled):
        fake.nvmlDeviceSetPowerManagementLimit_v2(None, 0, 300_000)
    assert inst.setter_calls == [
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceSetPowerManagementLimit_v2",
    ]
    assert inst.latency_s["nvmlDeviceGetPowerManagementLimit"]  # reads are timed, not blocked


def run_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_palsd_run_process_in_dry_run_calls_no_setter(tmp_path: Path) -> None:
    config = tmp_path / "palsd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "control": {"period_s": 0.1, "dry_run": True},
                "gpu": {"backend": "nvml"},
                "budget": {"default_w": BUDGET_PER_GPU_W},
                "api": {"socket": str(tmp_path / "palsd.sock"), "admin_group": None},
                "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
                "state": {"dir": str(tmp_path / "state")},
                "logging": {"format": "json"},
            }
        )
    )
    guard_log = tmp_path / "setters.log"
    out = tmp_path / "daemon.log"
    cmd = [sys.executable, str(TOOL), "--daemon-shim", "--fake", "--guard-log", str(guard_log)]
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [*cmd, "--", "run", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=run_env(),
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if out.read_text().count("would_set_power_limit") >= 3:
                    break
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    would = [e for e in events if e.get("event") == "would_set_power_limit"]
    assert rc == 0, out.read_text()[-2000:]
    assert len(would) >= 3
    assert all(e["limit_w"] == BUDGET_PER_GPU_W for e in would)
    assert not guard_log.exists()


@pytest.mark.slow
def test_h100_check_fake_run_passes_its_checks_with_no_setter(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--fake", "--phase-s", "0.6", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "h100_check.json").read_text())
    assert summary["setter_calls"] == []
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["daemon"]["would_set_count"] > 0
    assert {r["phase"] for r in summary["phases"]} >= {"idle", "decode_b64", "matmul_8192"}
