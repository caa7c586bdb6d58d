"""Real processes for integration tests: a simulated host and a palsd daemon, each on
ephemeral ports and temp paths, each stopped (and waited for) on exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

PALSD = [sys.executable, "-m", "palsd.cli.palsd"]
PALSCTL = [sys.executable, "-m", "palsd.cli.palsctl"]


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def sim_host(tmp: Path, gpus: int = 4, servers: int = 2, *extra: str) -> Iterator[dict[str, Any]]:
    ready = tmp / "simhost.json"
    log = open(tmp / "simhost.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *PALSD,
            "sim-host",
            "--gpus",
            str(gpus),
            "--servers",
            str(servers),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 30, "sim-host ready")
        assert proc.poll() is None, (tmp / "simhost.log").read_text()
        info = json.loads(ready.read_text())
        info["proc"] = proc
        yield info
    finally:
        _stop(proc)
        log.close()


def gpu_limits(sim: dict[str, Any]) -> dict[int, float]:
    data = httpx.get(f"{sim['url']}/sim/v1/gpus", timeout=5).json()
    return {g["index"]: g["power_limit_w"] for g in data["gpus"]}


def palsd_config(sim: dict[str, Any], tmp: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "control": {"period_s": 0.2},
        "gpu": {"backend": "sim", "sim_url": sim["url"]},
        "budget": {},
        "servers": [
            {
                "name": s["name"],
                "url": s["url"],
                "gpus": s["gpus"],
                "slo": {"ttft_s": 2.0, "itl_s": 0.1},
            }
            for s in sim["servers"]
        ],
        "api": {"socket": str(tmp / "palsd.sock"), "admin_group": None},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "state": {"dir": str(tmp / "state")},
        "logging": {"format": "json", "level": "info"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


class Palsd:
    def __init__(self, proc: subprocess.Popen[bytes], config: Path, log: Path, socket: Path):
        self.proc, self.config, self.log_path, self.socket = proc, config, log, socket

    def palsctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PALSCTL, "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status(self) -> dict[str, Any]:
        proc = self.palsctl("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if item.get("event") == name:
                out.append(item)
        return out

    def metrics_port(self) -> int:
        return int(self.events("metrics_listening")[0]["port"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return _stop(self.proc, sig)


@contextmanager
def palsd(
    tmp: Path, cfg: dict[str, Any], nofile: int | None = None, args: tuple[str, ...] = ()
) -> Iterator[Palsd]:
    """`nofile`: the daemon's RLIMIT_NOFILE (soft and hard), as LimitNOFILE= would set it;
    `args`: more arguments for `palsd run`."""
    path = tmp / "palsd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp / "palsd.log"
    log = open(log_path, "wb")  # noqa: SIM115
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    limit = None if nofile is None else ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
    proc = subprocess.Popen(
        [*(limit or []), *PALSD, "run", "--config", str(path), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    daemon = Palsd(proc, path, log_path, Path(cfg["api"]["socket"]))
    try:
        wait_until(lambda: daemon.socket.exists() or proc.poll() is not None, 30, "palsd socket")
        assert proc.poll() is None, log_path.read_text()
        wait_until(lambda: daemon.events("decision"), 30, "palsd's first decision")
        yield daemon
    finally:
        daemon.stop()
        log.close()
