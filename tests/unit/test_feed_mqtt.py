"""MqttFeed's message handling without a broker: coalescing (newest per topic wins, the rest
counted as superseded), every message ending in exactly one counted outcome, a failing hand-over
that costs nothing else, the bounded queue that counts what it drops, the rate-limited rejection
log, and the sequence book written through the one atomic-write helper."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from palsd.config import MqttConfig
from palsd.core.budget import BudgetEntry
from palsd.feed.mqtt import FEED_REASONS, KINDS, MqttFeed, _Inbox, _write_book
from palsd.feed.payload import BudgetMessage, Rules, SeqBook, decode_budget, encode
from palsd.report.logs import LogLimiter

NOW = 1_800_000_000.0
HOST = "t/palsd/h1/budget"
RACK = "t/palsd/rack7/budget"
PRICE = "t/palsd/price"


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.budgets: list[tuple[str, BudgetEntry | None]] = []
        self.prices: list[float] = []
        self.fail = fail

    def facility_budget(self, origin: str, entry: BudgetEntry | None) -> None:
        if self.fail:
            raise RuntimeError("daemon bug")
        self.budgets.append((origin, entry))

    def price(self, price_per_mwh: float, expires_at: float | None) -> None:
        self.prices.append(price_per_mwh)


def make_feed(sink: Sink | None = None) -> tuple[MqttFeed, Sink, CollectorRegistry]:
    sink = sink or Sink()
    registry = CollectorRegistry()
    cfg = MqttConfig(
        enabled=True,
        host_id="h1",
        topic_prefix="t/palsd",
        groups=[{"topic": "rack7", "share": 0.5}],
    )
    return MqttFeed(cfg, sink, dict, registry, clock=lambda: NOW), sink, registry


def budget(seq: int, watts: float, sender: str = "fms") -> bytes:
    return encode({"budget_w": watts, "seq": seq, "issued_at": NOW, "ttl_s": 60, "sender": sender})


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def outcomes(registry: CollectorRegistry) -> float:
    handled = sum(value(registry, "palsd_mqtt_messages_total", kind=k) for k in KINDS)
    rejected = sum(value(registry, "palsd_mqtt_rejected_total", reason=r) for r in FEED_REASONS)
    return handled + rejected


def test_newest_budget_per_topic_wins_and_older_ones_are_superseded() -> None:
    feed, sink, registry = make_feed()
    feed.handle_batch([(HOST, budget(1, 3000)), (HOST, budget(2, 2500)), (HOST, budget(3, 2800))])
    assert [(o, e.watts, e.seq) for o, e in sink.budgets if e] == [(HOST, 2800, 3)]
    assert value(registry, "palsd_mqtt_messages_total", kind="superseded") == 2
    assert value(registry, "palsd_mqtt_messages_total", kind="budget") == 1
    # A superseded message was still seen: a late copy of it is a replay, not news.
    feed.handle(HOST, budget(2, 100))
    assert value(registry, "palsd_mqtt_rejected_total", reason="replayed_seq") == 1
    assert len(sink.budgets) == 1


def test_topics_coalesce_separately_and_rejections_do_not_supersede() -> None:
    feed, sink, registry = make_feed()
    feed.handle_batch(
        [
            (HOST, budget(1, 3000)),
            (RACK, budget(1, 8000)),
            (HOST, b'{"sig":"\xc3\xa9"}'),  # rejected: must not hide the valid one before it
            (PRICE, encode({"price_per_mwh": 50, "seq": 1, "issued_at": NOW, "sender": "m"})),
            (PRICE, encode({"price_per_mwh": 60, "seq": 2, "issued_at": NOW, "sender": "m"})),
            ("t/palsd/other/budget", budget(1, 1)),
        ]
    )
    assert sorted((o, e.watts) for o, e in sink.budgets if e) == [(HOST, 3000), (RACK, 4000)]
    assert sink.prices == [60]
    assert value(registry, "palsd_mqtt_messages_total", kind="superseded") == 1
    assert value(registry, "palsd_mqtt_rejected_total", reason="missing_field") == 1
    assert value(registry, "palsd_mqtt_rejected_total", reason="unknown_topic") == 1


def test_every_received_message_has_exactly_one_counted_outcome() -> None:
    feed, _, registry = make_feed()
    batch = [
        (HOST, budget(1, 3000)),
        (HOST, budget(1, 3000)),  # the same bytes: duplicate
        (HOST, budget(2, 2000)),
        (HOST, b"\xff\xfe"),
        (HOST, b""),
        (RACK, b"[]"),
        (
            PRICE,
            b'{"price_per_mwh": 1, "seq": 1, "issued_at": 1, "sender": "x", "sig": "\xc3\xa9"}',
        ),
    ]
    for _ in range(3):
        feed.handle_batch(batch)
    assert value(registry, "palsd_mqtt_received_total") == 3 * len(batch)
    assert outcomes(registry) == 3 * len(batch)
    assert feed.state()["received_total"] == 3 * len(batch)


def test_a_failing_handover_costs_nothing_else() -> None:
    feed, sink, registry = make_feed(Sink(fail=True))
    feed.handle_batch([(HOST, budget(1, 3000)), (PRICE, b"nope")])
    assert value(registry, "palsd_mqtt_rejected_total", reason="malformed_json") == 1
    sink.fail = False
    feed.handle(HOST, budget(2, 2000))
    assert [e.watts for _, e in sink.budgets if e] == [2000]


def test_an_internal_error_is_counted_and_the_feed_carries_on(monkeypatch) -> None:
    feed, sink, registry = make_feed()

    def broken(*_: Any, **__: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("palsd.feed.mqtt.decode_budget", broken)
    feed.handle(HOST, budget(1, 3000))
    assert value(registry, "palsd_mqtt_rejected_total", reason="internal_error") == 1
    monkeypatch.undo()
    feed.handle(HOST, budget(2, 2000))
    assert [e.watts for _, e in sink.budgets if e] == [2000]


async def test_the_client_queue_counts_what_it_cannot_hold() -> None:
    dropped: list[int] = []
    inbox_type = type("Inbox", (_Inbox,), {"on_drop": staticmethod(lambda: dropped.append(1))})
    inbox = inbox_type(maxsize=2)
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    with pytest.raises(asyncio.QueueFull):  # aiomqtt catches it and logs a warning
        inbox.put_nowait("c")
    assert len(dropped) == 1
    assert [inbox.get_nowait(), inbox.get_nowait()] == ["a", "b"]


def test_rejection_log_is_rate_limited_per_reason_and_says_how_many_it_left_out() -> None:
    limiter = LogLimiter(burst=2, window_s=10)
    assert [limiter.allow("bad_signature", 0.0) for _ in range(5)] == [0, 0, None, None, None]
    assert limiter.allow("expired", 1.0) == 0  # another reason has its own allowance
    assert limiter.allow("bad_signature", 10.0) == 3  # a new window: the count of the gap
    assert limiter.allow("bad_signature", 10.5) == 0


def test_sequence_book_write_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    # Another user who can write to the state dir plants a link at the old fixed temp name.
    victim = tmp_path / "victim"
    victim.write_text("root-owned content")
    state = tmp_path / "state"
    state.mkdir()
    (state / ".mqtt-seq.json.tmp").symlink_to(victim)
    book = SeqBook().accepted(HOST, _decoded(7))
    _write_book(state / "mqtt-seq.json", json.dumps(book.to_json()).encode())
    assert victim.read_text() == "root-owned content"
    assert SeqBook.from_json(json.loads((state / "mqtt-seq.json").read_text())) == book
    assert (state / "mqtt-seq.json").stat().st_mode & 0o077 == 0


def _decoded(seq: int) -> BudgetMessage:
    msg = decode_budget(budget(seq, 3000), NOW, Rules(10_000, 3600, 30), topic=HOST)
    assert isinstance(msg, BudgetMessage)
    return msg


def test_budget_age_is_nan_until_the_first_budget() -> None:
    feed, _, registry = make_feed()
    assert math.isnan(value(registry, "palsd_facility_budget_age_seconds"))
    feed.handle(HOST, budget(1, 3000))
    assert value(registry, "palsd_facility_budget_age_seconds") == 0.0


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000, b"\xff\xfe", b'{"x": 1}', b'[["t", "s", 1]]', b""],
    ids=["too deep", "not UTF-8", "not a list", "short row", "empty"],
)
def test_an_unreadable_sequence_book_starts_empty_and_says_so(tmp_path: Path, content) -> None:
    path = tmp_path / "mqtt-seq.json"
    path.write_bytes(content)
    feed, _, _ = make_feed()
    assert feed._load_seqs(path) == SeqBook()
