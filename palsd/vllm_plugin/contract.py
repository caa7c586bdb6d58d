"""The batch-limit endpoint's contract, without vLLM or FastAPI: path, method names, who may
call it, request validation and how per-engine answers combine. Tested on its own; the
simulated host serves the same validation (palsd/sim/host_cli.py imports it)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
OPEN_ENV = "PALSD_PLUGIN_OPEN"
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own; --api-key on the command line wins over it
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
# The oldest vLLM whose scheduler has the admission limit (Scheduler.max_num_active_reqs).
MIN_VLLM = "0.31"


class ContractError(Exception):
    """A request that breaks the contract: `status` is the HTTP code, the message the reason."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


def load_token(env: Mapping[str, str] | None = None) -> str | None:
    """palsd's own plugin token: PALSD_PLUGIN_TOKEN, else the file PALSD_PLUGIN_TOKEN_FILE
    names; None when neither is set. OSError/ValueError when the file is unreadable or empty."""
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


@dataclass(frozen=True)
class Access:
    """Who may call the endpoint, decided once when vLLM starts.

    `tokens`: the bearer tokens accepted (any one); `open`: no token needed; `refused`: the
    reason every call is refused, with `refused_status`. `source` says where the rule came
    from, for the start-up log line. Exactly one of tokens / open / refused holds."""

    tokens: tuple[str, ...] = ()
    open: bool = False
    refused: str | None = None
    refused_status: int = 403
    source: str = ""

    def describe(self) -> str:
        if self.refused is not None:
            return f"every call refused ({self.refused_status}): {self.refused}"
        if self.open:
            return f"OPEN ({self.source}): anyone who reaches this port can change the batch limit"
        return f"bearer token required ({self.source})"


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    """A yes/no variable: True, False, or None when the value is neither."""
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def decide_access(
    env: Mapping[str, str] | None = None, api_keys: Sequence[str] | None = None
) -> Access:
    """Secure by default. In order: palsd's own token (PALSD_PLUGIN_TOKEN, or the file
    PALSD_PLUGIN_TOKEN_FILE names); else vLLM's own API key (`api_keys`, from --api-key,
    else VLLM_API_KEY), so an operator keeps one secret; else open only when
    PALSD_PLUGIN_OPEN=1; else every call is refused, saying how to configure it."""
    env = os.environ if env is None else env
    try:
        token = load_token(env)
    except (OSError, ValueError) as e:
        # A token that was meant to be there but cannot be read locks the door.
        return Access(refused=f"cannot read the plugin token: {e}", refused_status=503)
    if token is not None:
        src = TOKEN_ENV if env.get(TOKEN_ENV, "").strip() else f"{TOKEN_FILE_ENV}"
        return Access(tokens=(token,), source=src)
    keys = tuple(k for k in (api_keys or ()) if k)
    if keys:
        return Access(tokens=keys, source="vLLM's --api-key")
    env_key = env.get(API_KEY_ENV, "").strip()
    if env_key:
        return Access(tokens=(env_key,), source=f"vLLM's {API_KEY_ENV}")
    flag = _flag(env, OPEN_ENV)
    if flag:
        return Access(open=True, source=f"{OPEN_ENV}={env.get(OPEN_ENV, '').strip()}")
    bad = (
        ""
        if flag is not None
        else f"{OPEN_ENV}={env.get(OPEN_ENV)!r} is not one of 1/true/yes/on/0/false/no/off; "
    )
    return Access(
        refused=(
            f"{bad}no token configured: set {TOKEN_FILE_ENV} (or start vLLM with --api-key, "
            f"which the plugin then accepts), or {OPEN_ENV}=1 to let anyone who reaches this "
            "port change the batch limit"
        ),
        refused_status=403,
    )


def check_access(access: Access, authorization: str | None) -> None:
    """ContractError unless a call with this Authorization header may go on."""
    if access.refused is not None:
        raise ContractError(access.refused_status, f"palsd batch-limit endpoint: {access.refused}")
    if access.open:
        return
    check_token(access.tokens, authorization)


def check_token(expected: str | Sequence[str] | None, authorization: str | None) -> None:
    """401 unless `authorization` is "Bearer <one of expected>"; None expects nothing."""
    if expected is None:
        return
    tokens = (expected,) if isinstance(expected, str) else tuple(expected)
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    # Compare against every token, so the time taken does not say which one nearly matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given.encode(), token.encode())
    if scheme.lower() != "bearer" or not matched:
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
