"""The simulated host's batch-limit endpoint answers exactly as the vLLM plugin does: the same
table of requests (batch_limit_cases.py) that test_vllm_real.py sends to a real vLLM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.batch_limit_cases import REJECTED, Case, check_rejected, check_state
from tests.integration.procs import sim_host

MAX_NUM_SEQS = 16


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sim")
    with sim_host(tmp, 1, 1, "--model", "dense-8b", "--max-num-seqs", str(MAX_NUM_SEQS)) as info:
        yield info


def _url(sim: dict[str, Any]) -> str:
    return str(sim["servers"][0]["url"]) + "/pals/v1/batch-limit"


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.name)
def test_sim_host_rejects_like_the_plugin_and_changes_nothing(
    sim: dict[str, Any], case: Case
) -> None:
    url = _url(sim)
    check_state(httpx.put(url, json={"limit": 5}, timeout=10).json(), MAX_NUM_SEQS, 5)
    resp = httpx.put(
        url,
        content=case.body(MAX_NUM_SEQS),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    check_rejected(resp, case, MAX_NUM_SEQS)
    assert httpx.get(url, timeout=10).json()["limit"] == 5


@pytest.mark.parametrize("limit", [1, MAX_NUM_SEQS])
def test_sim_host_accepts_the_limits_the_plugin_accepts(sim: dict[str, Any], limit: int) -> None:
    resp = httpx.put(_url(sim), json={"limit": limit}, timeout=10)
    assert resp.status_code == 200, resp.text
    check_state(resp.json(), MAX_NUM_SEQS, limit)
    check_state(httpx.get(_url(sim), timeout=10).json(), MAX_NUM_SEQS, limit)
