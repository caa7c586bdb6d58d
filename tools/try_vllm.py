"""`make try-vllm`: palsd with simulated GPUs beside a real vLLM, for a machine with no GPU.

Starts, under --workdir (default run/try-vllm): a tiny random-weight MoE (tools/make_tiny_moe.py),
a key file, a real vLLM (the CPU build in .venv-vllm, both palsd plugins, the key as
VLLM_API_KEY, so the plugin requires it), a simulated host that plays one H100 (palsd reads and
caps only its GPUs; its own simulated server is not in palsd's config), palsd against both, and
a light load; then prints `palsctl status` until Ctrl-C or --seconds. palsd stops first (it
puts back what it changed), then the load, the simulated host and vLLM.

    .venv/bin/python tools/try_vllm.py [--seconds 120] [--vllm-url URL --key-file PATH]

--vllm-url attaches to a vLLM already running with the plugins instead of starting one.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PALSD = [sys.executable, "-m", "palsd.cli.palsd"]
PLUGINS = "palsd_batch_limit,palsd_batch_limit_api"
SERVER_NAME = "vllm-cpu"
VLLM_START_TIMEOUT_S = 900.0  # a busy 2-core machine has taken 212 s


class TryError(Exception):
    """A step failed; the message says which and where its log is."""


def _say(text: str) -> None:
    print(f"try-vllm: {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM to its process group, then SIGKILL if it does not go."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def _process(cmd: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
    try:
        yield proc
    finally:
        _stop(proc)


def _model(workdir: Path) -> Path:
    model = workdir / "tiny-moe"
    if not (model / "config.json").exists():
        _say(f"making a tiny MoE model in {model} (once)")
        subprocess.run(
            [str(VLLM_PY), str(ROOT / "tools" / "make_tiny_moe.py"), str(model)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return model


def _key(workdir: Path) -> Path:
    key = workdir / "api.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return key


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    started = time.monotonic()
    next_note = started + 15
    while True:
        if proc.poll() is not None:
            raise TryError(f"vLLM exited with {proc.returncode}; {log}:\n{_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                _say(f"vLLM is up at {url} after {time.monotonic() - started:.0f} s")
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now - started > VLLM_START_TIMEOUT_S:
            raise TryError(f"vLLM not up after {VLLM_START_TIMEOUT_S:.0f} s; see {log}")
        if now > next_note:
            _say(f"waiting for vLLM ({now - started:.0f} s; it takes 30 s to a few minutes)")
            next_note = now + 15
        time.sleep(0.5)


@contextmanager
def _vllm(workdir: Path, key: Path) -> Iterator[str]:
    if not VLLM_PY.exists():
        raise TryError(f"{VLLM_PY} is absent: run `make vllm-env` (make try-vllm does)")
    model = _model(workdir)
    port = _free_port()
    env = {
        **os.environ,
        "VLLM_API_KEY": key.read_text().strip(),
        "VLLM_PLUGINS": PLUGINS,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    for name in ("PALSD_PLUGIN_TOKEN", "PALSD_PLUGIN_TOKEN_FILE", "PALSD_PLUGIN_OPEN"):
        env.pop(name, None)
    cmd = [
        str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny-moe",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "8",
    ]  # fmt: skip
    log = workdir / "vllm.log"
    _say(f"starting vLLM (CPU build, tiny MoE, both palsd plugins); log {log}")
    # From workdir: it holds no folder named palsd that would shadow the installed plugin.
    with _process(cmd, log, cwd=workdir, env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        yield url


@contextmanager
def _sim_host(workdir: Path) -> Iterator[dict[str, Any]]:
    ready = workdir / "simhost.json"
    ready.unlink(missing_ok=True)
    # One H100 with a model that fits on it; palsd uses only the GPU.
    cmd = [
        *PALSD, "sim-host", "--gpus", "1", "--servers", "1", "--model", "dense-8b",
        "--listen", "127.0.0.1:0", "--ready-file", str(ready),
    ]  # fmt: skip
    log = workdir / "simhost.log"
    with _process(cmd, log) as proc:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TryError(f"the simulated host did not start; {log}:\n{_tail(log)}")
            time.sleep(0.1)
        yield json.loads(ready.read_text())


def palsd_config(
    workdir: Path, sim_url: str, vllm_url: str, key: Path, budget_w: float
) -> dict[str, Any]:
    return {
        "control": {"period_s": 1.0},
        "gpu": {"backend": "sim", "sim_url": sim_url},
        "budget": {"default_w": budget_w},
        "servers": [
            {
                "name": SERVER_NAME,
                "url": vllm_url,
                "gpus": [0],
                "admin_token_file": str(key.resolve()),
                "slo": {"ttft_s": 2.0, "itl_s": 0.2},
            }
        ],
        "api": {"socket": str((workdir / "palsd.sock").resolve()), "admin_group": None},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "state": {"dir": str((workdir / "state").resolve())},
        "logging": {"format": "json"},
    }


@contextmanager
def _palsd(workdir: Path, config: dict[str, Any]) -> Iterator[subprocess.Popen[bytes]]:
    path = workdir / "palsd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    sock = Path(config["api"]["socket"])
    sock.unlink(missing_ok=True)
    log = workdir / "palsd.log"
    _say(f"starting palsd; config {path}, log {log}")
    with _process([*PALSD, "run", "--config", str(path)], log) as proc:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TryError(f"palsd did not start; {log}:\n{_tail(log)}")
            time.sleep(0.1)
        yield proc


@contextmanager
def _load(vllm_url: str, key: Path, model: str, workers: int = 3) -> Iterator[list[int]]:
    """A few clients, each sending one 64-token completion after another; counts answers."""
    stop = threading.Event()
    done = [0]
    headers = {"Authorization": f"Bearer {key.read_text().strip()}"}
    body = {"model": model, "prompt": "the power cap", "max_tokens": 64, "ignore_eos": True}

    def work() -> None:
        with httpx.Client(timeout=120, headers=headers) as client:
            while not stop.is_set():
                try:
                    client.post(vllm_url + "/v1/completions", json=body).raise_for_status()
                    done[0] += 1
                except httpx.HTTPError:
                    stop.wait(1.0)

    threads = [threading.Thread(target=work, name=f"load-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        yield done
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=130)


def _served_model(vllm_url: str, key: Path) -> str:
    headers = {"Authorization": f"Bearer {key.read_text().strip()}"}
    data = httpx.get(vllm_url + "/v1/models", headers=headers, timeout=30).json()
    return str(data["data"][0]["id"])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from palsd.cli.palsctl import ApiError, Client, render_status
    from palsd.sense.simhost import SimHostBackend

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if args.vllm_url:
            if args.key_file is None:
                raise TryError("--vllm-url needs --key-file (the token the plugin accepts)")
            vllm_url, key = args.vllm_url.rstrip("/"), args.key_file
        else:
            key = _key(workdir)
            vllm_url = stack.enter_context(_vllm(workdir, key))
        sim = stack.enter_context(_sim_host(workdir))
        gpus = SimHostBackend(sim["url"]).read_all()
        budget_w = args.budget_w or round(0.7 * sum(g.max_limit_w for g in gpus))
        config = palsd_config(workdir, sim["url"], vllm_url, key, budget_w)
        model = _served_model(vllm_url, key)
        done = stack.enter_context(_load(vllm_url, key, model))
        daemon = stack.enter_context(_palsd(workdir, config))
        client = Client(Path(config["api"]["socket"]), None, None, 10.0)
        _say(
            f"simulated GPU at {sim['url']}, real vLLM at {vllm_url}; "
            f"in another shell: .venv/bin/palsctl --socket {config['api']['socket']} status"
        )
        started = time.monotonic()
        last: dict[str, Any] | None = None
        while daemon.poll() is None:
            try:
                last = client.call("GET", "/v1/status")
                text = render_status(last)
            except ApiError as err:
                text = f"(waiting for palsd: {err})"
            elapsed = time.monotonic() - started
            print(
                f"\n--- palsd beside a real vLLM, {elapsed:.0f} s, "
                f"{done[0]} completions answered (Ctrl-C to stop) ---\n{text}",
                flush=True,
            )
            if args.seconds and elapsed >= args.seconds:
                break
            time.sleep(args.refresh_s)
        if daemon.poll() is not None:
            raise TryError(f"palsd exited with {daemon.returncode}; see {workdir}/palsd.log")
        _say("stopping palsd (it puts back what it changed), the load, the sim host, vLLM")
        _stop(daemon)
        if daemon.returncode != 0:
            raise TryError(f"palsd stopped with {daemon.returncode}; see {workdir}/palsd.log")
        if last is None:
            raise TryError(f"palsd never answered a status call; see {workdir}/palsd.log")
        [server] = [v for v in last["servers"] if v["name"] == SERVER_NAME]
        summary = {k: server.get(k) for k in ("up", "batch_limit", "batch_control", "running")}
        _say(f"last status of {SERVER_NAME}: {json.dumps(summary)}, {done[0]} completions")
    _say(f"stopped cleanly; logs in {workdir}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "run" / "try-vllm")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    parser.add_argument("--refresh-s", type=float, default=3.0)
    parser.add_argument("--budget-w", type=float, default=None, help="default: 70%% of max")
    parser.add_argument("--vllm-url", default=None, help="use this running vLLM (with plugins)")
    parser.add_argument("--key-file", type=Path, default=None, help="its token, with --vllm-url")
    args = parser.parse_args()
    if args.seconds < 0 or args.refresh_s <= 0:
        parser.error("--seconds must be >= 0 and --refresh-s > 0")
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        _say(f"stopped (Ctrl-C); logs in {args.workdir}")
        return 0
    except TryError as err:
        _say(str(err))
        return 1


if __name__ == "__main__":
    sys.exit(main())
