"""Crash safety end to end: palsd is SIGKILLed with lowered limits on a real `palsd sim-host`,
and every limit comes back, by `palsd restore` (systemd's ExecStopPost) or by the next start."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.integration.procs import PALSD, gpu_limits, palsd, palsd_config, sim_host, wait_until

BATCH_PATH = "/pals/v1/batch-limit"


def batch_limits(sim: dict[str, Any]) -> dict[str, int]:
    return {
        s["name"]: httpx.get(s["url"] + BATCH_PATH, timeout=5).json()["limit"]
        for s in sim["servers"]
    }


def _changed(sim: dict[str, Any], budget_w: float, batch_before: dict[str, int]) -> bool:
    """Power limits under the budget and every batch limit moved off its original."""
    if sum(gpu_limits(sim).values()) > budget_w:
        return False
    now = batch_limits(sim)
    return all(now[name] != limit for name, limit in batch_before.items())


def _kill_with_limits_lowered(tmp: Path, sim: dict[str, Any], budget_w: float) -> Path:
    """Run palsd under budget_w until it has changed power and batch limits, SIGKILL it."""
    batch_before = batch_limits(sim)
    # The joint controller moves batch limits as well as caps, so both kinds get restored.
    cfg = palsd_config(sim, tmp, budget={"default_w": budget_w}, control={"controller": "joint"})
    with palsd(tmp, cfg) as d:
        wait_until(lambda: _changed(sim, budget_w, batch_before), 15, "power and batch changed")
        record = Path(cfg["state"]["dir"]) / "originals.json"
        assert record.exists(), "the originals record must exist before limits change"
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        return d.config


def test_restore_after_sigkill_puts_every_original_limit_back(tmp_path):
    with sim_host(tmp_path, gpus=4, servers=2) as sim:
        gpus_before, batch_before = gpu_limits(sim), batch_limits(sim)
        budget_w = 0.6 * sum(gpus_before.values())
        config = _kill_with_limits_lowered(tmp_path, sim, budget_w)

        # Nothing restored them: a killed process runs no clean-up of its own.
        left = gpu_limits(sim)
        assert sum(left.values()) <= budget_w and left != gpus_before
        assert batch_limits(sim) != batch_before
        record = json.loads((tmp_path / "state" / "originals.json").read_text())
        assert {int(i): e["limit_w"] for i, e in record["gpus"].items()} == gpus_before

        proc = subprocess.run(
            [*PALSD, "restore", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gpu_limits(sim) == gpus_before
        assert batch_limits(sim) == batch_before
        assert not (tmp_path / "state" / "originals.json").exists()

        # A second restore (systemd runs ExecStopPost after every stop) finds nothing to do.
        again = subprocess.run(
            [*PALSD, "restore", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0, again.stderr
        assert gpu_limits(sim) == gpus_before


def test_restart_after_sigkill_adopts_the_record_stays_under_budget_and_restores_at_exit(
    tmp_path,
):
    with sim_host(tmp_path, gpus=4, servers=2) as sim:
        gpus_before, batch_before = gpu_limits(sim), batch_limits(sim)
        budget_w = 0.6 * sum(gpus_before.values())
        first = tmp_path / "first"
        first.mkdir()
        second = tmp_path / "second"
        second.mkdir()
        state = {"dir": str(tmp_path / "state")}
        joint = {"controller": "joint"}
        cfg = palsd_config(sim, first, budget={"default_w": budget_w}, state=state, control=joint)
        with palsd(first, cfg) as d:
            wait_until(lambda: _changed(sim, budget_w, batch_before), 15, "limits changed")
            assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        assert gpu_limits(sim) != gpus_before and batch_limits(sim) != batch_before

        # The next run starts from the lowered limits. It adopts the killed run's record: the
        # recorded originals stay the originals (the lowered values are never taken for them)
        # and the limits stay under the budget meanwhile, instead of going back up to the
        # originals until its first tick.
        cfg2 = palsd_config(sim, second, budget={"default_w": budget_w}, state=state, control=joint)
        with palsd(second, cfg2) as d2:
            events = d2.events("reconciled_previous_run")
            assert events, d2.log_path.read_text()[-2000:]
            assert events[0]["adopted_gpus"] == sorted(gpus_before)
            assert events[0]["restored_gpus"] == []
            assert sum(gpu_limits(sim).values()) <= budget_w + 1e-6
            assert d2.stop(signal.SIGTERM) == 0
        assert gpu_limits(sim) == gpus_before
        assert batch_limits(sim) == batch_before
        assert not (tmp_path / "state" / "originals.json").exists()
