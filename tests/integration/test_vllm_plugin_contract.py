"""The plugin's contract code on its own (no vLLM needed): PUT validation, who may call (secure
by default), the token's sources, and how data-parallel engines' answers combine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from palsd.vllm_plugin.contract import (
    API_KEY_ENV,
    MIN_VLLM,
    OPEN_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    Access,
    ContractError,
    check_access,
    check_token,
    combine,
    decide_access,
    load_token,
    parse_limit,
)
from palsd.vllm_plugin.engine import get_batch_limit, set_batch_limit


@pytest.mark.parametrize("limit", [1, 4, 8])
def test_limits_within_max_num_seqs_are_accepted(limit: int) -> None:
    assert parse_limit({"limit": limit}, 8) == limit


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"limit": 0}, 422, "between 1 and max_num_seqs=8"),
        ({"limit": 9}, 422, "between 1 and max_num_seqs=8"),
        ({"limit": -3}, 422, "between"),
        ({"limit": "4"}, 400, "integer"),
        ({"limit": 2.0}, 400, "integer"),
        ({"limit": True}, 400, "integer"),
        ({"limit": None}, 400, "integer"),
        ({}, 400, "missing field"),
        ({"limit": 2, "max": 4}, 400, "unknown field"),
        ([2], 400, "JSON object"),
        (None, 400, "JSON object"),
    ],
)
def test_bad_bodies_are_rejected_with_a_reason(body: Any, status: int, says: str) -> None:
    with pytest.raises(ContractError) as err:
        parse_limit(body, 8)
    assert err.value.status == status and says in err.value.reason


def test_token_is_checked_only_when_configured() -> None:
    check_token(None, None)
    check_token("s3cret", "Bearer s3cret")
    check_token("s3cret", "bearer s3cret")
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(ContractError) as err:
            check_token("s3cret", header)
        assert err.value.status == 401


def test_any_of_several_tokens_is_accepted() -> None:
    check_token(("key-a", "key-b"), "Bearer key-b")
    with pytest.raises(ContractError):
        check_token(("key-a", "key-b"), "Bearer key-c")


def _refusal(access: Access, authorization: str | None) -> int | None:
    try:
        check_access(access, authorization)
    except ContractError as e:
        return e.status
    return None


@pytest.mark.parametrize(
    ("env", "api_keys", "tokens", "source"),
    [
        ({TOKEN_ENV: "palsd-tok"}, None, ("palsd-tok",), TOKEN_ENV),
        # palsd's own token wins over vLLM's key and over an open flag
        ({TOKEN_ENV: "palsd-tok", OPEN_ENV: "1"}, ["vllm-key"], ("palsd-tok",), TOKEN_ENV),
        # one secret: vLLM's --api-key (a list: any of them), else VLLM_API_KEY
        ({}, ["k1", "k2"], ("k1", "k2"), "--api-key"),
        ({API_KEY_ENV: "env-key"}, None, ("env-key",), API_KEY_ENV),
        ({API_KEY_ENV: "env-key"}, ["cli-key"], ("cli-key",), "--api-key"),
        ({API_KEY_ENV: "env-key", OPEN_ENV: "1"}, None, ("env-key",), API_KEY_ENV),
    ],
)
def test_a_configured_token_is_required(
    env: dict[str, str], api_keys: list[str] | None, tokens: tuple[str, ...], source: str
) -> None:
    access = decide_access(env, api_keys)
    assert (access.tokens, access.open, access.refused) == (tokens, False, None)
    assert source in access.source and "token required" in access.describe()
    assert _refusal(access, f"Bearer {tokens[-1]}") is None
    assert _refusal(access, None) == 401
    assert _refusal(access, "Bearer nope") == 401


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_open_only_when_asked_and_said_so(value: str) -> None:
    access = decide_access({OPEN_ENV: value}, None)
    assert access.open and access.refused is None
    assert "OPEN" in access.describe() and "anyone" in access.describe()
    assert _refusal(access, None) is None


@pytest.mark.parametrize("env", [{}, {OPEN_ENV: "0"}, {OPEN_ENV: "no"}, {OPEN_ENV: ""}])
def test_nothing_configured_refuses_every_call_and_says_how_to_configure(
    env: dict[str, str],
) -> None:
    access = decide_access(env, [])
    assert access.refused is not None and access.refused_status == 403
    for says in (TOKEN_FILE_ENV, "--api-key", f"{OPEN_ENV}=1"):
        assert says in access.refused
    with pytest.raises(ContractError) as err:
        check_access(access, "Bearer anything")
    assert err.value.status == 403 and TOKEN_FILE_ENV in err.value.reason


def test_a_malformed_open_flag_is_named_and_does_not_open() -> None:
    access = decide_access({OPEN_ENV: "maybe"}, None)
    assert not access.open and access.refused is not None
    assert "'maybe'" in access.refused and _refusal(access, None) == 403


def test_an_unreadable_token_file_locks_the_door(tmp_path: Path) -> None:
    absent = decide_access({TOKEN_FILE_ENV: str(tmp_path / "absent"), OPEN_ENV: "1"}, ["k"])
    empty_file = tmp_path / "empty"
    empty_file.write_text("\n")
    empty = decide_access({TOKEN_FILE_ENV: str(empty_file)}, None)
    for access in (absent, empty):
        assert access.refused is not None and access.refused_status == 503
        assert _refusal(access, "Bearer k") == 503
    assert empty.refused is not None and "empty" in empty.refused


def test_token_comes_from_the_env_or_a_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert load_token({}) is None
    assert load_token({TOKEN_ENV: "from-env", TOKEN_FILE_ENV: str(f)}) == "from-env"
    assert load_token({TOKEN_FILE_ENV: str(f)}) == "from-file"
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_token({TOKEN_FILE_ENV: str(f)})
    with pytest.raises(OSError):
        load_token({TOKEN_FILE_ENV: str(tmp_path / "absent")})


def test_data_parallel_answers_sum_load_and_keep_the_per_engine_limit() -> None:
    a = {"max_num_seqs": 8, "limit": 4, "running": 4, "waiting": 2}
    b = {"max_num_seqs": 8, "limit": 4, "running": 3, "waiting": 0}
    assert combine([a, b]) == {"max_num_seqs": 8, "limit": 4, "running": 7, "waiting": 2}
    with pytest.raises(ContractError):
        combine([])


class _Scheduler:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


class _Core:
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler


def test_engine_methods_read_and_set_the_admission_limit_clamped_to_max_num_seqs() -> None:
    sched = _Scheduler(max_num_running_reqs=8, max_num_active_reqs=8, running=[1, 2], waiting=[3])
    core = _Core(sched)
    assert get_batch_limit(core) == {"max_num_seqs": 8, "limit": 8, "running": 2, "waiting": 1}
    assert set_batch_limit(core, 3)["limit"] == 3 and sched.max_num_active_reqs == 3
    assert set_batch_limit(core, 99)["limit"] == 8
    assert set_batch_limit(core, 0)["limit"] == 1


def test_a_vllm_without_the_admission_limit_is_named_with_the_version_needed() -> None:
    """vLLM 0.30's scheduler has max_num_running_reqs but no max_num_active_reqs. The methods
    answer the reason (no raise, so no traceback in vLLM's log) and change nothing."""
    sched = _Scheduler(max_num_running_reqs=8, running=[], waiting=[])
    why = (
        "this vLLM's scheduler lacks ['max_num_active_reqs']: palsd's batch limit needs "
        f"vLLM >= {MIN_VLLM} (V1 engine, Scheduler.max_num_active_reqs)"
    )
    assert get_batch_limit(_Core(sched)) == {"error": why}
    assert set_batch_limit(_Core(sched), 2) == {"error": why}
    assert not hasattr(sched, "max_num_active_reqs")
