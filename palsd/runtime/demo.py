"""`palsd demo` (what `make run` starts): a simulated host, palsd against it, live status.

Everything lives under --workdir (default ./run): the sim host's ready file, the generated
palsd config, the socket that `palsctl status` finds from the checkout, logs and state.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from palsd.sim.demo_profile import (
    BUDGET_CUT_FROM_S,
    BUDGET_CUT_TO_S,
    BUDGET_CYCLE_S,
    DEFAULT_BUDGET_FRAC,
    DEMO_RATE_PER_S,
    override_at,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("run"))
    parser.add_argument(
        "--budget-w",
        type=float,
        default=None,
        help=f"host budget; default {round(DEFAULT_BUDGET_FRAC * 100)}%% of the GPUs' maximum"
        " limits",
    )
    parser.add_argument("--controller", choices=["joint", "demand_split"], default="joint")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--refresh-s", type=float, default=1.0)


def demo_config(
    ready: dict[str, Any], workdir: Path, budget_w: float, controller: str
) -> dict[str, Any]:
    return {
        "control": {"period_s": 0.5, "controller": controller},
        "gpu": {"backend": "sim", "sim_url": ready["url"]},
        "budget": {"default_w": budget_w},
        "servers": [
            {
                "name": s["name"],
                "url": s["url"],
                "gpus": s["gpus"],
                "slo": {"ttft_s": 2.0, "itl_s": 0.1},
            }
            for s in ready["servers"]
        ],
        "api": {"socket": str((workdir / "palsd.sock").resolve()), "admin_group": None},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "state": {"dir": str((workdir / "state").resolve())},
        "logging": {"format": "json"},
    }


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready in {timeout_s:.0f} s")
        time.sleep(0.1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ready_file = workdir / "simhost.json"
    sock = workdir / "palsd.sock"
    for stale in (ready_file, sock):
        stale.unlink(missing_ok=True)
    exe = [sys.executable, "-m", "palsd.cli.palsd"]
    procs: list[subprocess.Popen[bytes]] = []
    sim_log = open(workdir / "simhost.log", "wb")  # noqa: SIM115 - lives as long as the demo
    palsd_log = open(workdir / "palsd.log", "wb")  # noqa: SIM115
    try:
        sim = subprocess.Popen(
            [
                *exe,
                "sim-host",
                "--gpus",
                str(args.gpus),
                "--servers",
                str(args.servers),
                "--workload",
                "demo",
                "--rate",
                str(DEMO_RATE_PER_S),
                "--seed",
                str(args.seed),
                "--listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready_file),
            ],
            stdout=sim_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(sim)
        _wait_for(ready_file, sim, "the simulated host", 30)
        ready = json.loads(ready_file.read_text())
        from palsd.sense.simhost import SimHostBackend

        gpus = SimHostBackend(ready["url"]).read_all()
        max_sum_w = sum(g.max_limit_w for g in gpus)
        budget_w = args.budget_w or round(DEFAULT_BUDGET_FRAC * max_sum_w)
        config_path = workdir / "palsd.yaml"
        config_path.write_text(
            yaml.safe_dump(demo_config(ready, workdir, budget_w, args.controller), sort_keys=False)
        )
        # Own sessions: Ctrl-C reaches only this process, which stops palsd (so it restores
        # the limits) before the simulated host it restores them on.
        daemon = subprocess.Popen(
            [*exe, "run", "--config", str(config_path)],
            stdout=palsd_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(daemon)
        _wait_for(sock, daemon, "palsd", 30)
        from palsd.cli.palsctl import ApiError, Client, render_status

        client = Client(sock, None, None, 5.0)
        print(f"simulated host {ready['url']}; palsd config {config_path}; logs in {workdir}/")
        print(
            f"try in another shell: .venv/bin/palsctl status | set-budget {budget_w * 0.6:.0f}W"
            " --ttl 2m | clear-budget"
        )
        print(
            f"the demo cuts the budget to {override_at(BUDGET_CUT_FROM_S, max_sum_w)} W "
            f"for {BUDGET_CUT_TO_S - BUDGET_CUT_FROM_S:.0f} s of every {BUDGET_CYCLE_S:.0f} s "
            "(a local override); the load swells and bursts"
        )
        time.sleep(1.5)
        started = time.monotonic()
        held: float | None = None
        while daemon.poll() is None:
            # The demo's budget timeline (palsd/sim/demo_profile.py), through the local API.
            want = override_at(time.monotonic() - started, max_sum_w)
            if want != held:
                try:
                    if want is None:
                        client.call("DELETE", "/v1/budget/override")
                    else:
                        body = {"budget_w": want, "ttl_s": None, "reason": "demo: budget cut"}
                        client.call("PUT", "/v1/budget/override", body)
                    held = want
                except ApiError:
                    pass  # palsd not answering yet: try again next refresh
            try:
                text = render_status(client.call("GET", "/v1/status"))
            except ApiError as err:
                text = f"(waiting for palsd: {err})"
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(
                f"palsd demo: {args.gpus} simulated GPUs, {args.servers} servers"
                f" (Ctrl-C to stop)\n\n{text}\n",
                flush=True,
            )
            time.sleep(args.refresh_s)
        print(f"palsd exited with code {daemon.returncode}; see {workdir}/palsd.log")
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:
        print(f"palsd demo: {err}; see the logs in {workdir}/", file=sys.stderr)
        return 1
    finally:
        # palsd first, so it restores the limits on a host that is still there.
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        sim_log.close()
        palsd_log.close()
        if os.environ.get("PALSD_DEMO_KEEP") is None:
            ready_file.unlink(missing_ok=True)
