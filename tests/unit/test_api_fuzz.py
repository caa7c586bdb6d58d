"""Fuzzing the local API's change endpoint in-process (aiohttp test client, the real budget
book, safety rules and power actuator behind it): whatever the body, the answer is a clear
error or a valid change, never a 500 and never a traceback, and no GPU limit ever leaves its
constraints or exceeds the budget in force. 2,000 cases in `make test` (tests/fuzz_profiles.py)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from palsd.api.server import ApiServer
from tests.fuzz_profiles import FUZZ
from tests.unit.api_port import MemoryPort

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-10, max_value=2_000_000),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-5, max_value=2_000_000),
)
anything = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
override_like = st.fixed_dictionaries(
    {},
    optional={
        "budget_w": numbers | anything,
        "ttl_s": numbers | st.none() | anything,
        "reason": st.text(max_size=250) | anything,
        "extra": anything,
    },
)


# Near the valid region, so the good path and its edges (0, 1e6, tiny TTLs) are well covered.
plausible = st.fixed_dictionaries(
    {"budget_w": st.floats(min_value=-1, max_value=1_100_000) | st.integers(-1, 1_100_000)},
    optional={
        "ttl_s": st.none() | st.floats(min_value=-1, max_value=1e9) | st.integers(-1, 10**8),
        "reason": st.text(max_size=210),
    },
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["plausible", "override", "json", "bytes", "mangled"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    strategy: st.SearchStrategy[Any] = {
        "plausible": plausible,
        "override": override_like,
        "json": anything,
        "mangled": plausible | override_like,
    }[kind]
    value = draw(strategy)
    text = json.dumps(value)
    if kind == "mangled" and text:
        cut = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:cut] + draw(st.text(max_size=5)) + text[cut:]
    return text.encode("utf-8", errors="surrogatepass")


def _valid_watts(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and 0 < value <= 1_000_000
    )


def test_any_body_gives_a_clear_error_or_a_valid_change_within_the_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.new_event_loop()
    port = MemoryPort(tmp_path / "state", gpus=4)
    api = ApiServer(port, tmp_path / "unused.sock", None, token=TOKEN, max_override_ttl_s=None)
    client = TestClient(TestServer(api.app()), loop=loop)
    loop.run_until_complete(client.start_server())
    applied = 0

    @FUZZ
    @given(body=bodies())
    def check(body: bytes) -> None:
        nonlocal applied

        async def put() -> tuple[int, Any]:
            resp = await client.put("/v1/budget/override", data=body, headers=AUTH)
            return resp.status, await resp.json(content_type=None)

        before = port.changes
        status, answer = loop.run_until_complete(put())
        assert status in (200, 400, 413), (status, answer, body)
        if status == 200:
            sent = json.loads(body)
            assert _valid_watts(sent["budget_w"]), sent
            assert set(sent) <= {"budget_w", "ttl_s", "reason"}
            assert port.book.override is not None
            assert port.book.override.watts == float(sent["budget_w"])
            assert port.changes == before + 1
            applied += 1
        else:
            assert isinstance(answer, dict) and answer["reason"] and answer["error"], answer
            assert port.changes == before, "a refused body changed something"
        gpus = port.host.read_all()
        for g in gpus:
            assert g.min_limit_w <= g.power_limit_w <= g.max_limit_w, g
        budget = port.book.in_force(port.now_s).effective_w
        floor = sum(g.min_limit_w for g in gpus)
        if budget is not None and budget >= floor:
            assert sum(g.power_limit_w for g in gpus) <= budget + 1e-6

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.close()
    assert not [r for r in caplog.records if r.exc_info], "a client's body logged a traceback"
    assert not [ln for ln in port.log.lines if ln[0] == "exception"]
    assert applied > 0, "no generated body was ever valid: the strategy misses the good path"
