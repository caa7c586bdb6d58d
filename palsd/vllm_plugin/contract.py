"""The batch-limit endpoint's contract, without vLLM or FastAPI: path, method names, request
validation, token check and how per-engine answers combine. Tested on its own."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PATH = "/pals/v1/batch-limit"
# EngineCore methods the general plugin adds; the endpoint calls them as utility methods.
GET_METHOD = "pals_get_batch_limit"
SET_METHOD = "pals_set_batch_limit"
GENERAL_PLUGIN = "palsd_batch_limit"
ENDPOINT_PLUGIN = "palsd_batch_limit_api"
TOKEN_ENV = "PALSD_PLUGIN_TOKEN"
TOKEN_FILE_ENV = "PALSD_PLUGIN_TOKEN_FILE"


class ContractError(Exception):
    """A request that breaks the contract: `status` is the HTTP code, the message the reason."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


def load_token(env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from PALSD_PLUGIN_TOKEN, else from the file PALSD_PLUGIN_TOKEN_FILE
    names; None when neither is set (the endpoint is then open, as vLLM's own routes are)."""
    env = os.environ if env is None else env
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = env.get(TOKEN_FILE_ENV, "").strip()
    if path:
        token = Path(path).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{TOKEN_FILE_ENV}={path} is empty")
        return token
    return None


def check_token(expected: str | None, authorization: str | None) -> None:
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), expected):
        raise ContractError(401, "missing or wrong bearer token")


def parse_limit(body: Any, max_num_seqs: int) -> int:
    """The limit a PUT asks for, or ContractError naming what is wrong."""
    if not isinstance(body, dict):
        raise ContractError(400, 'body must be a JSON object like {"limit": 4}')
    extra = sorted(set(body) - {"limit"})
    if extra:
        raise ContractError(400, f"unknown field(s) {extra}; only 'limit' is accepted")
    if "limit" not in body:
        raise ContractError(400, "missing field 'limit'")
    limit = body["limit"]
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ContractError(400, f"'limit' must be an integer, got {limit!r}")
    if not 1 <= limit <= max_num_seqs:
        raise ContractError(
            422, f"'limit' must be between 1 and max_num_seqs={max_num_seqs}, got {limit}"
        )
    return limit


def combine(states: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """One answer from each data-parallel engine -> the endpoint's answer. The limit and
    max_num_seqs are per engine (the smallest, should they differ); running and waiting are
    summed over the engines."""
    if not states:
        raise ContractError(503, "no engine answered")
    return {
        "max_num_seqs": min(int(s["max_num_seqs"]) for s in states),
        "limit": min(int(s["limit"]) for s in states),
        "running": sum(int(s["running"]) for s in states),
        "waiting": sum(int(s["waiting"]) for s in states),
    }
