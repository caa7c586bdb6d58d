"""Budget and price payloads: every rejection reason, signatures required and not, replays."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from palsd.feed.payload import (
    BUDGET_FIELDS,
    REASONS,
    BudgetMessage,
    PriceMessage,
    Rejected,
    Rules,
    SeqBook,
    decode_budget,
    decode_price,
    encode,
)
from palsd.feed.signing import canonical_json, sign, signing_input

NOW = 1_800_000_000.0
KEY = b"s3cret-key"
RULES = Rules(max_budget_w=20_000, max_ttl_s=3600, max_clock_skew_s=30)
SIGNED = Rules(20_000, 3600, 30, require_signature=True, hmac_key=KEY)
TOPIC = "t/h1/budget"
PRICE = "t/price"


def good(**changes: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "budget_w": 4000,
        "seq": 7,
        "issued_at": NOW - 1,
        "ttl_s": 300,
        "reason": "grid peak",
        "sender": "fms-1",
    }
    for k, v in changes.items():
        if v is _DROP:
            msg.pop(k, None)
        else:
            msg[k] = v
    return msg


_DROP = object()


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


REJECTIONS: list[tuple[str, bytes, str]] = [
    ("too large", b" " * 5000, "too_large"),
    ("not JSON", b"{budget_w: 4000", "malformed_json"),
    ("not UTF-8", b'{"budget_w": "\xff"}', "malformed_json"),
    ("duplicate key", b'{"budget_w": 1, "budget_w": 2}', "malformed_json"),
    ("JSON array", b"[4000]", "not_an_object"),
    ("JSON number", b"4000", "not_an_object"),
    ("unknown field", raw(good(watts=4000)), "unknown_field"),
    ("missing budget_w", raw(good(budget_w=_DROP)), "missing_field"),
    ("missing seq", raw(good(seq=_DROP)), "missing_field"),
    ("missing issued_at", raw(good(issued_at=_DROP)), "missing_field"),
    ("missing sender", raw(good(sender=_DROP)), "missing_field"),
    ("empty sender", raw(good(sender="")), "missing_field"),
    ("no expiry at all", raw(good(ttl_s=_DROP)), "missing_field"),
    ("budget_w a string", raw(good(budget_w="4000")), "wrong_type"),
    ("budget_w a bool", raw(good(budget_w=True)), "wrong_type"),
    ("budget_w null", raw(good(budget_w=None)), "wrong_type"),
    ("seq a float", raw(good(seq=7.0)), "wrong_type"),
    ("seq a bool", raw(good(seq=True)), "wrong_type"),
    ("sender a number", raw(good(sender=5)), "wrong_type"),
    ("reason a list", raw(good(reason=["x"])), "wrong_type"),
    ("budget_w NaN", b'{"budget_w": NaN, "seq": 1, "issued_at": 1, "sender": "a"}', "not_finite"),
    (
        "budget_w Infinity",
        b'{"budget_w": Infinity, "seq": 1, "issued_at": 1, "sender": "a"}',
        "not_finite",
    ),
    ("budget_w 1e999", raw(good()).replace(b"4000", b"1e999"), "not_finite"),
    ("huge integer", raw(good(budget_w=10**400)), "above_max"),
    ("negative budget", raw(good(budget_w=-5)), "not_positive"),
    ("zero budget", raw(good(budget_w=0)), "not_positive"),
    ("absurd budget", raw(good(budget_w=20_001)), "above_max"),
    ("negative seq", raw(good(seq=-1)), "bad_seq"),
    ("seq beyond 53 bits", raw(good(seq=2**53)), "bad_seq"),
    ("ttl and expires_at", raw(good(expires_at=NOW + 60)), "conflicting_expiry"),
    ("zero ttl", raw(good(ttl_s=0)), "not_positive"),
    ("issued_at zero", raw(good(issued_at=0)), "not_positive"),
    (
        "expires_at before issued_at",
        raw(good(ttl_s=_DROP, expires_at=NOW - 10)),
        "bad_expiry",
    ),
    ("ttl above max", raw(good(ttl_s=3601)), "ttl_too_long"),
    (
        "expires_at too far",
        raw(good(ttl_s=_DROP, expires_at=NOW + 7200)),
        "ttl_too_long",
    ),
    ("issued in the future", raw(good(issued_at=NOW + 31)), "from_the_future"),
    ("expired on arrival (ttl)", raw(good(issued_at=NOW - 400)), "expired"),
    (
        "expired on arrival (absolute)",
        raw(good(ttl_s=_DROP, issued_at=NOW - 100, expires_at=NOW)),
        "expired",
    ),
    ("long reason", raw(good(reason="x" * 300)), "above_max"),
]


@pytest.mark.parametrize(("case", "payload", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_budget_rejection_reasons(case: str, payload: bytes, reason: str) -> None:
    result = decode_budget(payload, NOW, RULES, topic=TOPIC)
    assert isinstance(result, Rejected), case
    assert result.reason == reason, result.detail
    assert reason in REASONS


def test_every_reason_but_transport_ones_is_covered_by_the_table() -> None:
    covered = {r[2] for r in REJECTIONS}
    # these three come from signatures, sequence numbers and routing: tested below / in mqtt tests
    assert set(REASONS) - covered == {
        "missing_signature",
        "bad_signature",
        "replayed_seq",
        "unknown_topic",
    }


def test_valid_budget_decodes_with_expiry_from_ttl() -> None:
    result = decode_budget(raw(good()), NOW, RULES, topic=TOPIC)
    assert isinstance(result, BudgetMessage)
    assert (result.budget_w, result.seq, result.sender) == (4000.0, 7, "fms-1")
    assert result.expires_at == NOW - 1 + 300
    assert result.reason == "grid peak"


def test_valid_budget_with_absolute_expiry_and_small_clock_skew() -> None:
    msg = good(ttl_s=_DROP, issued_at=NOW + 20, expires_at=NOW + 120, reason=_DROP)
    result = decode_budget(raw(msg), NOW, RULES, topic=TOPIC)
    assert isinstance(result, BudgetMessage)
    assert result.expires_at == NOW + 120
    assert result.reason == ""


def test_group_topic_bound_is_passed_in_for_the_unscaled_value() -> None:
    big = raw(good(budget_w=80_000))
    assert isinstance(decode_budget(big, NOW, RULES, topic=TOPIC), Rejected)
    assert isinstance(
        decode_budget(big, NOW, RULES, topic=TOPIC, max_budget_w=20_000 / 0.25), BudgetMessage
    )


# ---- signatures ----


def test_signed_message_accepted_when_signature_required() -> None:
    assert isinstance(
        decode_budget(encode(good(), KEY, topic=TOPIC), NOW, SIGNED, topic=TOPIC), BudgetMessage
    )


def test_unsigned_message_rejected_when_signature_required() -> None:
    result = decode_budget(encode(good()), NOW, SIGNED, topic=TOPIC)
    assert isinstance(result, Rejected) and result.reason == "missing_signature"


def test_signature_checked_before_fields_when_required() -> None:
    # garbage without a signature says "missing_signature", not what is wrong inside it
    result = decode_budget(raw(good(budget_w="lots")), NOW, SIGNED, topic=TOPIC)
    assert isinstance(result, Rejected) and result.reason == "missing_signature"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: {**m, "budget_w": 9000},
        lambda m: {**m, "sig": m["sig"][:-1] + ("0" if m["sig"][-1] != "0" else "1")},
        lambda m: {**m, "sig": "zz"},
        lambda m: {**m, "sig": "é"},  # the poison message of issue 12: non-ASCII
        lambda m: {**m, "sig": m["sig"] + "00"},
        lambda m: {**m, "sig": "g" * 64},
        lambda m: {**m, "sig": 5},
        lambda m: {**m, "sig": ["a"]},
        lambda m: {**m, "sig": sign(b"another key", TOPIC, "budget", m)},
        lambda m: {**m, "sig": sign(KEY, "t/h2/budget", "budget", m)},
        lambda m: {**m, "sig": sign(KEY, TOPIC, "price", m)},
    ],
    ids=[
        "changed field",
        "flipped digit",
        "not hex",
        "non-ASCII",
        "too long",
        "hex-length but not hex",
        "a number",
        "a list",
        "other key",
        "other topic",
        "other kind",
    ],
)
def test_bad_signature_rejected(tamper: Any) -> None:
    signed = json.loads(encode(good(), KEY, topic=TOPIC))
    result = decode_budget(raw(tamper(signed)), NOW, SIGNED, topic=TOPIC)
    assert isinstance(result, Rejected) and result.reason == "bad_signature"


def test_bad_signature_rejected_even_when_not_required_if_a_key_is_set() -> None:
    rules = Rules(20_000, 3600, 30, require_signature=False, hmac_key=KEY)
    assert isinstance(decode_budget(encode(good()), NOW, rules, topic=TOPIC), BudgetMessage)
    result = decode_budget(encode(good(), b"wrong", topic=TOPIC), NOW, rules, topic=TOPIC)
    assert isinstance(result, Rejected) and result.reason == "bad_signature"


def test_signature_ignored_without_a_key() -> None:
    assert isinstance(
        decode_budget(encode(good(), b"whatever", topic=TOPIC), NOW, RULES, topic=TOPIC),
        BudgetMessage,
    )


def test_uppercase_hex_signature_accepted() -> None:
    signed = json.loads(encode(good(), KEY, topic=TOPIC))
    signed["sig"] = signed["sig"].upper()
    assert isinstance(decode_budget(raw(signed), NOW, SIGNED, topic=TOPIC), BudgetMessage)


def test_canonical_form_is_sorted_compact_utf8_without_sig() -> None:
    obj = {"sender": "ünï", "budget_w": 1.5, "seq": 1, "sig": "abc"}
    assert canonical_json(obj) == '{"budget_w":1.5,"sender":"ünï","seq":1}'.encode()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_recipe_in_docs_gives_the_same_signature(tmp_path) -> None:
    # The docs' shell recipe: printf the scheme, kind, topic and canonical fields, HMAC them.
    key_file = tmp_path / "key"
    key_file.write_text(KEY.decode() + "\n")
    payload = canonical_json(good()).decode()
    script = (
        'printf \'palsd-feed-v2\\nbudget\\n%s\\n%s\' "$TOPIC" "$PAYLOAD" '
        '| openssl dgst -sha256 -hmac "$(cat "$KEYFILE")" -r | cut -d\' \' -f1'
    )
    out = subprocess.run(
        ["bash", "-c", script],
        env={"PAYLOAD": payload, "TOPIC": TOPIC, "KEYFILE": str(key_file), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == sign(KEY, TOPIC, "budget", good())
    assert (
        signing_input(TOPIC, "budget", good())
        == f"palsd-feed-v2\nbudget\n{TOPIC}\n{payload}".encode()
    )


# ---- sequence numbers ----


def _msg(seq: int, budget_w: float = 4000) -> BudgetMessage:
    result = decode_budget(raw(good(seq=seq, budget_w=budget_w)), NOW, RULES, topic=TOPIC)
    assert isinstance(result, BudgetMessage)
    return result


def test_seq_must_grow_per_sender_and_topic() -> None:
    book = SeqBook().accepted("t/host/budget", _msg(7))
    assert book.check("t/host/budget", _msg(8)) == "new"
    stale = book.check("t/host/budget", _msg(6))
    assert isinstance(stale, Rejected) and stale.reason == "replayed_seq"
    replay = book.check("t/host/budget", _msg(7, budget_w=9000))
    assert isinstance(replay, Rejected) and replay.reason == "replayed_seq"
    # another topic keeps its own sequence
    assert book.check("t/rack1/budget", _msg(1)) == "new"


def test_same_bytes_again_is_a_duplicate_not_a_replay() -> None:
    book = SeqBook().accepted("t/host/budget", _msg(7))
    assert book.check("t/host/budget", _msg(7)) == "duplicate"


# ---- price ----


def test_price_may_be_negative_and_needs_no_expiry() -> None:
    msg = {"price_per_mwh": -12.5, "seq": 1, "issued_at": NOW, "sender": "market"}
    result = decode_price(raw(msg), NOW, RULES, topic=PRICE)
    assert isinstance(result, PriceMessage)
    assert (result.price_per_mwh, result.expires_at) == (-12.5, None)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"price_per_mwh": "cheap"}, "wrong_type"),
        ({"price_per_mwh": 2e6}, "above_max"),
        ({"budget_w": 5}, "unknown_field"),
        ({"ttl_s": 10, "issued_at": NOW - 20}, "expired"),
    ],
)
def test_price_rejections(changes: dict[str, Any], reason: str) -> None:
    msg = {"price_per_mwh": 50.0, "seq": 1, "issued_at": NOW, "sender": "market", **changes}
    result = decode_price(raw(msg), NOW, RULES, topic=PRICE)
    assert isinstance(result, Rejected) and result.reason == reason


# ---- the published JSON Schema agrees with the decoder ----


def test_json_schema_matches_the_decoder() -> None:
    from importlib.resources import files

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(files("palsd").joinpath("schemas/budget.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["properties"]) == set(BUDGET_FIELDS)
    validator = jsonschema.Draft202012Validator(schema)
    signed = json.loads(encode(good(), KEY, topic=TOPIC))
    for ok in (good(), signed, good(ttl_s=_DROP, expires_at=NOW + 60)):
        assert not list(validator.iter_errors(ok)), ok
    for bad in (good(budget_w=-1), good(seq=1.5), good(ttl_s=_DROP), good(extra=1)):
        assert list(validator.iter_errors(bad)), bad
        assert isinstance(decode_budget(raw(bad), NOW, RULES, topic=TOPIC), Rejected)


def test_seq_book_round_trips_and_rejects_a_corrupt_record():
    book = SeqBook().accepted(
        "t/h1/budget", BudgetMessage(2500.0, 7, 0.0, 60.0, "fms", "", "d" * 64)
    )
    again = SeqBook.from_json(json.loads(json.dumps(book.to_json())))
    assert again == book
    for bad in ({"x": 1}, [["t", "fms", "7", "d"]], [["t", "fms", True, "d"]], [["t", "fms"]]):
        with pytest.raises(ValueError):
            SeqBook.from_json(bad)
