"""The plugin's contract code on its own (no vLLM needed): PUT validation, token checks,
the token's sources, and how data-parallel engines' answers combine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from palsd.vllm_plugin.contract import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ContractError,
    check_token,
    combine,
    load_token,
    parse_limit,
)


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
