"""`palsd sim-host` as a real process, driven over HTTP through palsd's own sim backend and
httpx: the contract in docs/simhost.md."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from palsd.errors import GpuInvalidArgument
from palsd.sense.simhost import SimHostBackend
from palsd.sense.vllm_metrics import parse_metrics
from tests.integration.procs import PALSD, sim_host


@pytest.fixture
def simhost(tmp_path: Path) -> Iterator[dict[str, Any]]:
    extra = ("--workload", "poisson", "--speed", "10", "--seed", "3")
    with sim_host(tmp_path, 4, 2, *extra) as info:
        yield info


def test_ready_file_names_the_gpus_and_servers(simhost: dict[str, Any]) -> None:
    base = simhost["url"]
    assert base.startswith("http://127.0.0.1:")
    assert simhost["gpus"] == 4
    assert simhost["servers"] == [
        {"name": "vllm-0", "url": f"{base}/vllm/0", "gpus": [0, 1]},
        {"name": "vllm-1", "url": f"{base}/vllm/1", "gpus": [2, 3]},
    ]
    listed = httpx.get(f"{base}/sim/v1/servers", timeout=5).json()
    assert listed == {"servers": simhost["servers"]}


def test_gpus_through_the_sim_backend(simhost: dict[str, Any]) -> None:
    backend = SimHostBackend(simhost["url"])
    try:
        gpus = backend.read_all()
        assert [g.index for g in gpus] == [0, 1, 2, 3]
        assert all(
            (g.min_limit_w, g.max_limit_w, g.default_limit_w) == (200, 700, 700) for g in gpus
        )
        assert all(g.power_w is not None and 60 < g.power_w < 700 for g in gpus)
        backend.set_power_limit_w(1, 350)
        with pytest.raises(GpuInvalidArgument, match=r"\[200, 700\]"):
            backend.set_power_limit_w(1, 150)
        after = {g.index: g for g in backend.read_all()}
        assert after[1].power_limit_w == 350 and after[1].enforced_limit_w == 350
        assert after[0].power_limit_w == 700
    finally:
        backend.close()
    # state lives in the sim host: a new client (a restarted palsd) sees it
    again = SimHostBackend(simhost["url"], indices=[1])
    try:
        assert [g.power_limit_w for g in again.read_all()] == [350]
    finally:
        again.close()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/sim/v1/gpus/0/power-limit", b"not json", 400),
        ("/sim/v1/gpus/0/power-limit", b'{"power_limit_w": "300"}', 400),
        ("/sim/v1/gpus/0/power-limit", b'{"power_limit_w": true}', 400),
        ("/sim/v1/gpus/0/power-limit", b"[300]", 400),
        ("/sim/v1/gpus/0/power-limit", b'{"power_limit_w": 9999}', 400),
        ("/sim/v1/gpus/9/power-limit", b'{"power_limit_w": 300}', 404),
        ("/sim/v1/gpus/x/power-limit", b'{"power_limit_w": 300}', 404),
    ],
)
def test_bad_power_limit_puts_are_rejected_and_change_nothing(
    simhost: dict[str, Any], path: str, body: bytes, status: int
) -> None:
    base = simhost["url"]
    resp = httpx.put(
        base + path, content=body, timeout=5, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status
    assert "error" in resp.json()
    gpus = httpx.get(f"{base}/sim/v1/gpus", timeout=5).json()["gpus"]
    assert [g["power_limit_w"] for g in gpus] == [700.0] * 4


def test_power_limit_put_returns_the_gpu(simhost: dict[str, Any]) -> None:
    resp = httpx.put(
        f"{simhost['url']}/sim/v1/gpus/2/power-limit", json={"power_limit_w": 420}, timeout=5
    )
    assert resp.status_code == 200
    gpu = resp.json()
    assert gpu["index"] == 2 and gpu["power_limit_w"] == 420
    assert set(gpu) == {
        "index",
        "name",
        "uuid",
        "power_w",
        "power_instant_w",
        "energy_j",
        "power_limit_w",
        "enforced_limit_w",
        "min_limit_w",
        "max_limit_w",
        "default_limit_w",
        "sm_clock_mhz",
    }


def test_metrics_are_vllm_text_and_move(simhost: dict[str, Any]) -> None:
    url = simhost["servers"][0]["url"]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    first = httpx.get(f"{url}/metrics", timeout=5)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(first.text)}
    assert {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens",
        "vllm:prompt_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_success",
    } <= names
    time.sleep(1.0)  # ten virtual seconds at --speed 10
    second = httpx.get(f"{url}/metrics", timeout=5).text
    (a,) = parse_metrics(first.text).values()
    (b,) = parse_metrics(second).values()
    assert b.generation_tokens is not None and a.generation_tokens is not None
    assert b.generation_tokens > a.generation_tokens


def test_batch_limit_contract(simhost: dict[str, Any]) -> None:
    url = simhost["servers"][1]["url"] + "/pals/v1/batch-limit"
    state = httpx.get(url, timeout=5).json()
    assert set(state) == {"max_num_seqs", "limit", "running", "waiting"}
    assert state["max_num_seqs"] == 256 and state["limit"] == 256
    for bad in (
        b'{"limit": 0}',
        b'{"limit": 257}',
        b'{"limit": 2.5}',
        b'{"limit": true}',
        b'{"limit": "8"}',
        b'{"max": 8}',
        b"{",
        b"8",
    ):
        resp = httpx.put(url, content=bad, timeout=5, headers={"content-type": "application/json"})
        assert resp.status_code in (400, 422), bad
        assert "error" in resp.json()
        assert httpx.get(url, timeout=5).json()["limit"] == 256
    ok = httpx.put(url, json={"limit": 8}, timeout=5)
    assert ok.status_code == 200 and ok.json()["limit"] == 8
    assert httpx.get(url, timeout=5).json()["limit"] == 8
    assert httpx.get(simhost["url"] + "/vllm/7/pals/v1/batch-limit", timeout=5).status_code == 404


def test_sigterm_stops_it_cleanly(simhost: dict[str, Any]) -> None:
    proc = simhost["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_bad_options_exit_2_with_a_reason(tmp_path: Path) -> None:
    out = subprocess.run(
        [*PALSD, "sim-host", "--gpus", "3", "--servers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--gpus 3" in out.stdout + out.stderr
