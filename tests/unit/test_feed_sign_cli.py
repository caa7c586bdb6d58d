"""`palsd sign-budget`: the documented worked example, output that the feed accepts, and clear
errors (exit 2, nothing printed on stdout) for a bad key file or bad fields."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from palsd.cli.palsd import main
from palsd.feed.payload import BudgetMessage, PriceMessage, Rules, decode_budget, decode_price

KEY = "example-key-do-not-use"
TOPIC = "dc1/palsd/gpu-07/budget"


@pytest.fixture(autouse=True)
def _keep_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # palsd's main(argv) sets sys.argv


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "feed.key"
    path.write_text(f"  {KEY}\n")  # surrounding whitespace is stripped, as palsd does
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["sign-budget", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_worked_example_from_the_docs(capsys, key_file) -> None:
    code, out, _ = run(
        capsys,
        *("--key-file", str(key_file), "--topic", TOPIC, "--budget-w", "4000"),
        *("--ttl-s", "300", "--sender", "fms-1", "--seq", "1043", "--issued-at", "1764320000"),
        *("--reason", "grid peak", "--no-check"),
    )
    assert code == 0
    assert out == (
        '{"budget_w":4000,"issued_at":1764320000,"reason":"grid peak","sender":"fms-1",'
        '"seq":1043,"sig":"ce838c5074f3affbae41bd7ac5e79295cd8be4797bbf48650ccea3ac8a7ca6f1",'
        '"ttl_s":300}\n'
    )


def test_output_is_accepted_by_the_feed(capsys, key_file) -> None:
    rules = Rules(10_000, 3600, 30, require_signature=True, hmac_key=KEY.encode())
    code, out, _ = run(capsys, "--key-file", str(key_file), "--topic", TOPIC, "--budget-w", "2500")
    assert code == 0
    got = decode_budget(out.strip().encode(), time.time(), rules, topic=TOPIC)
    assert isinstance(got, BudgetMessage) and got.budget_w == 2500
    code, out, _ = run(
        capsys, "--key-file", str(key_file), "--topic", "dc1/palsd/price", "--price-per-mwh", "-3"
    )
    assert code == 0 and "ttl_s" not in json.loads(out)
    price = decode_price(out.strip().encode(), time.time(), rules, topic="dc1/palsd/price")
    assert isinstance(price, PriceMessage) and price.price_per_mwh == -3


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--budget-w", "-5"], "not_positive"),
        (["--budget-w", "5", "--ttl-s", "1", "--expires-at", "9"], "not both"),
        (["--price-per-mwh", "5"], "needs --budget-w"),
        (["--budget-w", "5", "--seq", str(2**53)], "--seq"),
        (["--fields", "[1]"], "JSON object"),
        (["--fields", '{"x": NaN}'], "cannot be signed"),
    ],
)
def test_bad_fields_are_refused_with_the_reason(capsys, key_file, argv, says) -> None:
    code, out, err = run(capsys, "--key-file", str(key_file), "--topic", TOPIC, *argv)
    assert (code, out) == (2, "")
    assert says in err


def test_missing_or_empty_key_file_is_named(capsys, tmp_path) -> None:
    missing = tmp_path / "nope.key"
    code, out, err = run(capsys, "--key-file", str(missing), "--topic", TOPIC, "--budget-w", "1")
    assert (code, out) == (2, "") and str(missing) in err
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    code, out, err = run(capsys, "--key-file", str(empty), "--topic", TOPIC, "--budget-w", "1")
    assert (code, out) == (2, "") and "empty" in err
