"""No write without a durable record, with real processes: palsd runs on a real `palsd sim-host`
with its state directory on a tiny tmpfs that is read-only or full. It changes no limit, says
why (status, health, a metric) and keeps trying; once the directory is writable again it records
first, then acts; after SIGKILL `palsd restore` has what it needs and puts every limit back."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.integration.procs import PALSD, gpu_limits, palsd, palsd_config, sim_host, wait_until


def _mount_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs for the state directory"
    return None


@contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _failures(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("palsd_state_write_failures_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.skipif(_mount_reason() is not None, reason=str(_mount_reason()))
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_unwritable_state_dir_changes_nothing_and_restore_has_what_it_needs(
    tmp_path: Path, fault: str
) -> None:
    with tiny_tmpfs(tmp_path / "state") as state, sim_host(tmp_path, gpus=4, servers=2) as sim:
        filler = None
        if fault == "full":
            filler = _fill(state)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        before = gpu_limits(sim)
        budget_w = 0.6 * sum(before.values())
        cfg = palsd_config(sim, tmp_path, budget={"default_w": budget_w})
        with palsd(tmp_path, cfg) as d:
            problem = wait_until(
                lambda: d.status().get("state_record_problem"), 30, "the record problem in status"
            )
            assert "originals.json" in problem
            health = json.loads(d.palsctl("health").stdout or "{}")
            assert health.get("state_record_ok") is False, health
            # It keeps trying every tick, and writes nothing while it cannot record.
            port = d.metrics_port()
            seen = _failures(port)
            wait_until(lambda: _failures(port) >= seen + 3, 30, "three more failed saves")
            assert gpu_limits(sim) == before
            assert not (state / "originals.json").exists()

            # The operator frees the directory: palsd records first, then lowers the limits.
            if filler is not None:
                filler.unlink()
            else:
                subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
            wait_until(lambda: sum(gpu_limits(sim).values()) <= budget_w, 30, "limits lowered")
            wait_until(lambda: d.status().get("state_record_problem") is None, 30, "recovered")
            record = json.loads((state / "originals.json").read_text())
            assert {int(i): e["limit_w"] for i, e in record["gpus"].items()} == before
            assert d.stop(signal.SIGKILL) == -signal.SIGKILL

        assert sum(gpu_limits(sim).values()) <= budget_w
        proc = subprocess.run(
            [*PALSD, "restore", "--config", str(tmp_path / "palsd.yaml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gpu_limits(sim) == before


@pytest.mark.skipif(_mount_reason() is not None, reason=str(_mount_reason()))
def test_restore_on_a_read_only_state_dir_puts_the_limits_back_and_says_the_record_is_left(
    tmp_path: Path,
) -> None:
    """The record cannot be removed, but every limit is back: exit 0 (systemd's ExecStopPost
    must not report a failure the GPUs do not have) with a warning naming the file; once the
    directory is writable again, the next restore is still correct and removes it."""
    with tiny_tmpfs(tmp_path / "state") as state, sim_host(tmp_path, gpus=4, servers=2) as sim:
        before = gpu_limits(sim)
        budget_w = 0.6 * sum(before.values())
        cfg = palsd_config(sim, tmp_path, budget={"default_w": budget_w})
        with palsd(tmp_path, cfg) as d:
            wait_until(lambda: sum(gpu_limits(sim).values()) <= budget_w, 30, "limits lowered")
            assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)

        def restore() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*PALSD, "restore", "--config", str(tmp_path / "palsd.yaml")],
                capture_output=True,
                text=True,
                timeout=60,
            )

        proc = restore()
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out  # was 1: "cannot update .../originals.json"
        assert gpu_limits(sim) == before
        assert "originals_record_left" in out and str(state / "originals.json") in out, out
        assert (state / "originals.json").exists()

        subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        proc = restore()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gpu_limits(sim) == before
        assert not (state / "originals.json").exists()
