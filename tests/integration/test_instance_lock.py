"""One instance per state directory, with real processes on a real `palsd sim-host`: a second
`palsd run` and a `palsd restore` under a live daemon refuse and change nothing; after the
daemon is SIGKILLed, `palsd restore` puts every limit back."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import yaml

from tests.integration.procs import PALSD, gpu_limits, palsd, palsd_config, sim_host, wait_until


def _palsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PALSD, *args], capture_output=True, text=True, timeout=60)


def test_second_instance_and_restore_refuse_while_the_first_runs(tmp_path: Path) -> None:
    with sim_host(tmp_path, gpus=4, servers=2) as sim:
        before = gpu_limits(sim)
        budget_w = 0.6 * sum(before.values())
        cfg = palsd_config(sim, tmp_path, budget={"default_w": budget_w})
        record = Path(cfg["state"]["dir"]) / "originals.json"
        with palsd(tmp_path, cfg) as d:
            wait_until(lambda: sum(gpu_limits(sim).values()) <= budget_w, 15, "limits lowered")
            saved = record.read_bytes()

            for argv in (
                ["run", "--config", str(d.config)],
                ["restore", "--config", str(d.config)],
            ):
                proc = _palsd(*argv)
                assert proc.returncode == 2, proc.stdout + proc.stderr
                lines = proc.stderr.strip().splitlines()
                assert len(lines) == 1, proc.stderr
                assert f"pid {d.proc.pid}" in lines[0] and "state directory" in lines[0]
                # Nothing restored under the live daemon (which keeps controlling, so its
                # limits move), the same record, and its socket still answers.
                assert sum(gpu_limits(sim).values()) <= budget_w
                assert record.read_bytes() == saved
                assert d.proc.poll() is None
                assert d.status()["budget"]["effective_w"] == budget_w

            assert d.stop(signal.SIGKILL) == -signal.SIGKILL

        assert sum(gpu_limits(sim).values()) <= budget_w  # a killed process restores nothing
        assert {int(i): e["limit_w"] for i, e in json.loads(saved)["gpus"].items()} == before
        proc = _palsd("restore", "--config", str(tmp_path / "palsd.yaml"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gpu_limits(sim) == before
        assert not record.exists()


def test_socket_path_on_a_regular_file_refuses_even_in_dry_run(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    config = tmp_path / "palsd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gpu": {"backend": "sim", "sim_url": "http://127.0.0.1:9"},
                "api": {"socket": str(notes), "admin_group": None},
                "state": {"dir": str(tmp_path / "state")},
            }
        )
    )
    proc = _palsd("run", "--dry-run", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not a socket" in proc.stderr and str(notes) in proc.stderr
    assert notes.read_text() == "precious\n"
