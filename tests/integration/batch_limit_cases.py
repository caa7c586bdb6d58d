"""One table of PUT /pals/v1/batch-limit requests and the answers the contract promises,
run against the real vLLM plugin (test_vllm_real.py) and the simulated host
(test_simhost_batch_contract.py), so the two cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[int], bytes]  # max_num_seqs -> the raw request body
    status: int
    error: Callable[[int], str]  # max_num_seqs -> the whole {"error": ...} text
    error_prefix: bool = False  # the error text is a prefix (Python's JSON decoder adds detail)


def _json(value: Any) -> Callable[[int], bytes]:
    return lambda _m: json.dumps(value).encode()


def _range(got: str) -> Callable[[int], str]:
    return lambda m: f"'limit' must be between 1 and max_num_seqs={m}, got {got}"


_OBJECT = 'body must be a JSON object like {"limit": 4}'

REJECTED: tuple[Case, ...] = (
    Case("zero", _json({"limit": 0}), 422, _range("0")),
    Case("negative", _json({"limit": -3}), 422, _range("-3")),
    Case(
        "above max_num_seqs",
        lambda m: json.dumps({"limit": m + 1}).encode(),
        422,
        lambda m: _range(str(m + 1))(m),
    ),
    Case("string", _json({"limit": "4"}), 400, lambda _m: "'limit' must be an integer, got '4'"),
    Case("float", _json({"limit": 2.5}), 400, lambda _m: "'limit' must be an integer, got 2.5"),
    Case("bool", _json({"limit": True}), 400, lambda _m: "'limit' must be an integer, got True"),
    Case(
        "null limit", _json({"limit": None}), 400, lambda _m: "'limit' must be an integer, got None"
    ),
    Case("missing", _json({}), 400, lambda _m: "missing field 'limit'"),
    Case(
        "unknown field",
        _json({"limit": 2, "extra": 1}),
        400,
        lambda _m: "unknown field(s) ['extra']; only 'limit' is accepted",
    ),
    Case("array", _json([4]), 400, lambda _m: _OBJECT),
    Case("JSON null", _json(None), 400, lambda _m: _OBJECT),
    Case("empty body", lambda _m: b"", 400, lambda _m: _OBJECT),
    Case("not JSON", lambda _m: b"not json", 400, lambda _m: "body is not JSON: ", True),
)


def check_rejected(resp: httpx.Response, case: Case, max_num_seqs: int) -> None:
    """The answer is the case's status and exactly its {"error": ...} body."""
    body = resp.json()
    want = case.error(max_num_seqs)
    assert resp.status_code == case.status, (case.name, resp.status_code, body)
    assert set(body) == {"error"}, (case.name, body)
    if case.error_prefix:
        assert body["error"].startswith(want), (case.name, body)
    else:
        assert body["error"] == want, (case.name, body)


def check_state(body: Any, max_num_seqs: int, limit: int) -> None:
    """A 2xx answer: the four fields, integers, with the limit just set."""
    assert set(body) == {"max_num_seqs", "limit", "running", "waiting"}, body
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in body.values()), body
    assert (body["max_num_seqs"], body["limit"]) == (max_num_seqs, limit), body
