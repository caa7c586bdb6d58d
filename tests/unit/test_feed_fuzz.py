"""Fuzzing the feed's pure decode and verify path with hypothesis (> 10,000 cases per run).

What must hold for every input, valid, mutated-valid, arbitrary bytes or arbitrary JSON:
- totality: the decoder returns a message or a Rejected with a known reason, never raises;
  the verifier returns a bool, never raises;
- only a correctly signed message is accepted when signing is required: a mutation is accepted
  only when it did not change what was signed (whitespace, key order, hex case);
- an accepted message is fresh and within bounds;
- through the feed, only fresh, correctly signed, in-order messages change the budget, and each
  batch hands over exactly the newest accepted budget per topic.

The runs are derandomized, so CI sees the same cases every time (deterministic under load); set
PALSD_FUZZ_RANDOM=1 to explore new ones.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from palsd.config import MqttConfig
from palsd.core.budget import BudgetEntry
from palsd.feed.mqtt import FEED_REASONS, KINDS, MqttFeed
from palsd.feed.payload import (
    BUDGET_FIELDS,
    MAX_SEQ,
    PRICE_FIELDS,
    REASONS,
    BudgetMessage,
    PriceMessage,
    Rejected,
    Rules,
    decode_budget,
    decode_price,
)
from palsd.feed.signing import signed_message, verify

NOW = 1_800_000_000.0
KEY = b"fuzz-key"
MAX_W, MAX_TTL_S, SKEW_S = 20_000.0, 3600.0, 30.0
SIGNED = Rules(MAX_W, MAX_TTL_S, SKEW_S, require_signature=True, hmac_key=KEY)
OPEN = Rules(MAX_W, MAX_TTL_S, SKEW_S)
TOPICS = ("f/palsd/h1/budget", "f/palsd/rack7/budget")
PRICE_TOPIC = "f/palsd/price"

_FUZZ = settings(
    deadline=None,
    derandomize=os.environ.get("PALSD_FUZZ_RANDOM") is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def decode(raw: bytes, topic: str, rules: Rules) -> BudgetMessage | PriceMessage | Rejected:
    if topic == PRICE_TOPIC:
        return decode_price(raw, NOW, rules, topic=topic)
    return decode_budget(raw, NOW, rules, topic=topic)


def assert_total(result: Any) -> None:
    assert isinstance(result, BudgetMessage | PriceMessage | Rejected), result
    if isinstance(result, Rejected):
        assert result.reason in REASONS, result
        assert isinstance(result.detail, str)


def assert_within_bounds(result: BudgetMessage | PriceMessage) -> None:
    assert 0 <= result.seq <= MAX_SEQ
    assert 0 < result.issued_at <= NOW + SKEW_S
    assert result.sender and len(result.sender) <= 256
    if isinstance(result, BudgetMessage):
        assert math.isfinite(result.budget_w) and 0 < result.budget_w <= MAX_W
    else:
        assert math.isfinite(result.price_per_mwh) and abs(result.price_per_mwh) <= 1e6
    if result.expires_at is not None:
        assert result.expires_at > NOW
        assert result.expires_at - result.issued_at <= MAX_TTL_S


# ---- strategies ----

# Cheap strategies on purpose (generation, not decoding, is the cost): interesting strings and
# numbers from a pool, short random text, one level of nesting (deeper is covered by bytes).
INTERESTING_TEXT = [
    "",
    "a",
    "fms-1",
    "é",
    "\ud800",
    "\x00",
    "\u2028",
    "x" * 300,
    "0" * 64,
    "é" * 64,
]
texts = st.sampled_from(INTERESTING_TEXT) | st.text(max_size=8)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**53, 2**63, 10**400, -1, 0, 1e999, -0.0, 5e-324])
    | st.floats()
    | texts
)
json_values = (
    json_scalars
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(texts, json_scalars, max_size=3)
)
field_names = st.sampled_from(sorted(BUDGET_FIELDS | PRICE_FIELDS)) | texts
json_objects = st.dictionaries(field_names, json_values, max_size=6)
any_topic = st.sampled_from((*TOPICS, PRICE_TOPIC))


@st.composite
def valid_fields(draw: st.DrawFn, kind: str = "budget") -> dict[str, Any]:
    issued_at = draw(st.floats(min_value=NOW - 1000, max_value=NOW + SKEW_S))
    fields: dict[str, Any] = {
        "seq": draw(st.integers(min_value=0, max_value=MAX_SEQ)),
        "issued_at": draw(st.sampled_from([round(issued_at), issued_at])),
        "sender": draw(
            st.sampled_from(["fms-1", "é", "x" * 256]) | st.text(min_size=1, max_size=6)
        ),
    }
    lifetime = draw(st.floats(min_value=max(1.0, NOW - issued_at + 1), max_value=MAX_TTL_S - 1))
    if draw(st.booleans()):
        fields["ttl_s"] = lifetime
    else:
        fields["expires_at"] = issued_at + lifetime
    if kind == "budget":
        fields["budget_w"] = draw(
            st.integers(min_value=1, max_value=int(MAX_W))
            | st.floats(min_value=0.5, max_value=MAX_W)
        )
    else:
        fields["price_per_mwh"] = draw(st.floats(min_value=-1e6, max_value=1e6))
    if draw(st.booleans()):
        fields["reason"] = draw(texts.filter(lambda t: len(t) <= 256 and "\ud800" not in t))
    return fields


@st.composite
def valid_message(draw: st.DrawFn) -> tuple[str, dict[str, Any], bytes]:
    topic = draw(any_topic)
    kind = "price" if topic == PRICE_TOPIC else "budget"
    fields = draw(valid_fields(kind))
    return topic, fields, signed_message(KEY, topic, kind, fields)


# ---- totality on anything ----


@settings(_FUZZ, max_examples=6800)
@given(raw=st.binary(max_size=200), topic=any_topic)
def test_arbitrary_bytes_never_raise_and_never_pass_a_required_signature(
    raw: bytes, topic: str
) -> None:
    assert_total(decode(raw, topic, OPEN))
    result = decode(raw, topic, SIGNED)
    assert_total(result)
    assert isinstance(result, Rejected)


@settings(_FUZZ, max_examples=1500)
@given(obj=json_objects, topic=any_topic, sig=json_values | st.text(max_size=70))
def test_arbitrary_json_never_raises_and_open_acceptance_is_within_bounds(
    obj: dict[str, Any], topic: str, sig: Any
) -> None:
    for with_sig in (obj, {**obj, "sig": sig}):
        try:
            raw = json.dumps(with_sig, ensure_ascii=False).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError):
            raw = json.dumps(with_sig).encode()
        result = decode(raw, topic, OPEN)
        assert_total(result)
        if not isinstance(result, Rejected):
            assert_within_bounds(result)
        signed = decode(raw, topic, SIGNED)
        assert_total(signed)
        assert isinstance(signed, Rejected)  # nobody guesses an HMAC
        kind = "price" if topic == PRICE_TOPIC else "budget"
        assert verify(KEY, topic, kind, with_sig, sig) is False


# ---- valid and mutated-valid ----


@settings(_FUZZ, max_examples=500)
@given(message=valid_message())
def test_valid_signed_messages_are_accepted_with_their_values(
    message: tuple[str, dict[str, Any], bytes],
) -> None:
    topic, fields, raw = message
    result = decode(raw, topic, SIGNED)
    assert not isinstance(result, Rejected), (result, fields)
    assert_within_bounds(result)
    assert result.seq == fields["seq"] and result.sender == fields["sender"]
    # the same message on any other topic (another host, a group, the other kind) is refused
    for other in {*TOPICS, PRICE_TOPIC} - {topic}:
        refused = decode(raw, other, SIGNED)
        assert isinstance(refused, Rejected) and refused.reason in (
            "bad_signature",
            "unknown_field",
            "missing_field",
        )


MUTATIONS_PER_EXAMPLE = 8
_POOL: list[Any] = [None, True, 0, -1, 2**53, 10**400, 1e999, -0.0, 0.5, "", "é", "\ud800", [], {}]
_POOL += ["0" * 64, "é" * 64, "x" * 300, 4000, 4000.0, NOW, NOW + 60]


def _mutate(raw: bytes, rng: Any) -> bytes:
    """One random change to a signed message: bytes flipped, inserted or cut, a field set,
    dropped or added, the sig replaced, the JSON re-spaced or the sig's hex upper-cased."""
    what = rng.choice(["flip", "insert", "delete", "field", "sig", "drop", "space", "upper"])
    i = rng.randrange(len(raw))
    if what == "flip":
        return raw[:i] + bytes([raw[i] ^ rng.randrange(1, 256)]) + raw[i + 1 :]
    if what == "insert":
        return raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) + raw[i:]
    if what == "delete":
        return raw[:i] + raw[i + rng.randrange(1, 4) :]
    obj = json.loads(raw)
    names = sorted(BUDGET_FIELDS | PRICE_FIELDS | {"extra"})
    if what == "field":
        obj[rng.choice(names)] = rng.choice(_POOL)
    elif what == "sig":
        obj["sig"] = rng.choice(_POOL)
    elif what == "drop":
        obj.pop(rng.choice(names), None)
    elif what == "upper":
        obj["sig"] = obj["sig"].upper()
    indent = 1 if what == "space" else None
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return json.dumps(obj, indent=indent).encode()


@settings(_FUZZ, max_examples=900)
@given(message=valid_message(), rng=st.randoms(use_true_random=False), to_topic=any_topic)
def test_a_mutated_message_is_accepted_only_when_what_was_signed_is_unchanged(
    message: tuple[str, dict[str, Any], bytes], rng: Any, to_topic: str
) -> None:
    topic, fields, raw = message
    for _ in range(MUTATIONS_PER_EXAMPLE):
        mutated = _mutate(raw, rng)
        for on in (topic, to_topic):
            result = decode(mutated, on, SIGNED)
            assert_total(result)
            if isinstance(result, Rejected):
                continue
            # Accepted: it is the very message that was signed, on the topic it was signed for.
            assert on == topic
            parsed = json.loads(mutated)
            assert {k: v for k, v in parsed.items() if k != "sig"} == fields
            assert_within_bounds(result)


# ---- through the feed: in order, newest per topic, nothing stale ----


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Sink:
    def __init__(self) -> None:
        self.budgets: list[tuple[str, BudgetEntry | None]] = []

    def facility_budget(self, origin: str, entry: BudgetEntry | None) -> None:
        self.budgets.append((origin, entry))

    def price(self, price_per_mwh: float, expires_at: float | None) -> None:
        pass


@st.composite
def feed_traffic(draw: st.DrawFn) -> list[list[tuple[str, bytes, dict[str, Any] | None]]]:
    """Batches of messages: valid signed ones with small seqs from two senders (so replays,
    duplicates and reordering happen), stale ones, and garbage."""
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        batch = []
        for _ in range(draw(st.integers(1, 5))):
            topic = draw(st.sampled_from(TOPICS))
            choice = draw(st.integers(0, 9))
            if choice < 7:
                fields = {
                    "budget_w": draw(st.integers(1, 5000)),
                    "seq": draw(st.integers(0, 6)),
                    "issued_at": NOW - draw(st.sampled_from([0, 10, 5000])),
                    "ttl_s": 600,
                    "sender": draw(st.sampled_from(["a", "b"])),
                }
                key = KEY if choice < 6 else b"not the key"
                raw = signed_message(key, topic, "budget", fields)
                batch.append((topic, raw, fields if key == KEY else None))
            else:
                batch.append((topic, draw(st.binary(max_size=40)), None))
        batches.append(batch)
    return batches


@settings(_FUZZ, max_examples=300)
@given(traffic=feed_traffic())
def test_only_fresh_signed_in_order_budgets_reach_the_daemon_newest_per_topic(
    traffic: list[list[tuple[str, bytes, dict[str, Any] | None]]],
) -> None:
    registry = CollectorRegistry()
    cfg = MqttConfig(
        enabled=True, host_id="h1", topic_prefix="f/palsd", groups=[{"topic": "rack7", "share": 1}]
    )
    sink = Sink()
    feed = MqttFeed(cfg, sink, dict, registry, clock=lambda: NOW)
    feed.rules = SIGNED
    feed.log = _Quiet()  # thousands of log lines would cost more than the handling
    # The oracle: the last accepted (seq, bytes) per (topic, sender), kept independently.
    last: dict[tuple[str, str], tuple[int, bytes]] = {}
    expected: list[tuple[str, int, float]] = []
    received = 0
    for batch in traffic:
        newest: dict[str, tuple[int, float]] = {}
        for topic, raw, fields in batch:
            received += 1
            if fields is None or fields["issued_at"] + fields["ttl_s"] <= NOW:
                continue  # garbage, wrong key or expired: must change nothing
            seen = last.get((topic, fields["sender"]))
            if seen is not None and fields["seq"] <= seen[0]:
                continue  # a replay, or the same bytes again (a duplicate)
            last[(topic, fields["sender"])] = (fields["seq"], raw)
            newest[topic] = (fields["seq"], float(fields["budget_w"]))
        expected.extend((t, seq, w) for t, (seq, w) in newest.items())
        feed.handle_batch([(t, raw) for t, raw, _ in batch])
    got = [(o, e.seq, e.watts) for o, e in sink.budgets if e is not None]
    assert sorted(got) == sorted(expected)
    # and every message ended in exactly one counted outcome
    handled = sum(
        registry.get_sample_value("palsd_mqtt_messages_total", {"kind": k}) for k in KINDS
    )
    rejected = sum(
        registry.get_sample_value("palsd_mqtt_rejected_total", {"reason": r}) for r in FEED_REASONS
    )
    assert handled + rejected == received
    assert registry.get_sample_value("palsd_mqtt_rejected_total", {"reason": "internal_error"}) == 0
