"""MqttFeed against a real Mosquitto: budgets applied, expiry, rejections counted, the broker
killed and restarted, retained status, online/offline state and the last will."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client import CollectorRegistry

from palsd.config import MqttConfig
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.types import BudgetSource
from palsd.feed.mqtt import MqttFeed
from palsd.feed.payload import encode
from tests.mosquitto import Broker, mosquitto_binary

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
]

KEY = b"feed-test-key"


class RecordingSink:
    """The daemon's side of the BudgetSink port, with a real budget book behind it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, BudgetEntry | None]] = []
        self.prices: list[tuple[float, float | None]] = []
        self.book = BudgetBook(default_w=10_000, fallback_w=3000, facility_expected=True)

    def facility_budget(self, origin: str, entry: BudgetEntry | None) -> None:
        self.calls.append((origin, entry))
        self.book = self.book.with_facility(origin, entry)

    def price(self, price_per_mwh: float, expires_at: float | None) -> None:
        self.prices.append((price_per_mwh, expires_at))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def feed_config(broker: Broker, **changes: Any) -> MqttConfig:
    base: dict[str, Any] = {
        "enabled": True,
        "url": broker.url,
        "host_id": "h1",
        "topic_prefix": "test/palsd",
        "groups": [{"topic": "rack7", "share": 0.25}],
        "status_interval_s": 0.2,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "keepalive_s": 5,
    }
    base.update(changes)
    return MqttConfig(**base)


STATUS = {"budget": {"effective_w": 3000, "source": "facility"}, "infeasible": True}


@pytest.fixture
async def running(broker: Broker) -> AsyncIterator[Callable[..., Any]]:
    """Start feeds on the loop; every one is cancelled (cleanly) at the end."""
    tasks: list[asyncio.Task[None]] = []

    def start(cfg: MqttConfig) -> tuple[MqttFeed, RecordingSink, CollectorRegistry]:
        sink, registry = RecordingSink(), CollectorRegistry()
        feed = MqttFeed(cfg, sink, lambda: STATUS, registry)
        tasks.append(asyncio.create_task(feed.run()))
        return feed, sink, registry

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until(predicate: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def publish(broker: Broker, topic: str, payload: bytes, retain: bool = False) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


def budget(seq: int, watts: float, ttl_s: float = 60, **extra: Any) -> dict[str, Any]:
    return {
        "budget_w": watts,
        "seq": seq,
        "issued_at": time.time(),
        "ttl_s": ttl_s,
        "sender": "fms",
        **extra,
    }


def rejected(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("palsd_mqtt_rejected_total", {"reason": reason}) or 0.0


async def test_budget_applied_for_host_and_group_topics(broker, running):
    feed, sink, registry = running(feed_config(broker))
    await until(lambda: feed.state()["connected"], "connected")
    await publish(broker, "test/palsd/h1/budget", encode(budget(1, 4000, reason="peak")))
    await until(lambda: sink.calls, "host budget")
    origin, entry = sink.calls[0]
    assert origin == "test/palsd/h1/budget"
    assert entry is not None
    assert (entry.watts, entry.seq, entry.reason, entry.origin) == (4000, 1, "peak", origin)
    assert entry.expires_at == pytest.approx(time.time() + 60, abs=5)
    # a group budget counts at this host's share, and the lowest live one wins
    await publish(broker, "test/palsd/rack7/budget", encode(budget(1, 12_000)))
    await until(lambda: len(sink.calls) == 2, "group budget")
    assert sink.calls[1][0] == "test/palsd/rack7/budget"
    assert sink.calls[1][1] is not None and sink.calls[1][1].watts == 3000
    in_force = sink.book.in_force(time.time())
    assert (in_force.effective_w, in_force.source) == (3000, BudgetSource.FACILITY)
    assert registry.get_sample_value("palsd_mqtt_messages_total", {"kind": "budget"}) == 2
    assert registry.get_sample_value("palsd_mqtt_connected") == 1
    assert feed.state()["messages_total"]["budget"] == 2


async def test_price_reaches_the_sink(broker, running):
    feed, sink, _ = running(feed_config(broker))
    await until(lambda: feed.state()["connected"], "connected")
    msg = {"price_per_mwh": 87.5, "seq": 3, "issued_at": time.time(), "sender": "market"}
    await publish(broker, "test/palsd/price", encode(msg))
    await until(lambda: sink.prices, "price")
    assert sink.prices == [(87.5, None)]


async def test_expiry_carried_and_expired_message_rejected(broker, running):
    feed, sink, registry = running(feed_config(broker))
    await until(lambda: feed.state()["connected"], "connected")
    await publish(broker, "test/palsd/h1/budget", encode(budget(1, 2500, ttl_s=1.0)))
    await until(lambda: sink.calls, "short-lived budget")
    entry = sink.calls[0][1]
    assert entry is not None and entry.expires_at is not None
    assert sink.book.in_force(entry.expires_at - 0.01).effective_w == 2500
    after = sink.book.in_force(entry.expires_at)
    assert (after.effective_w, after.source) == (3000, BudgetSource.FALLBACK)
    stale = budget(2, 1000, ttl_s=5, issued_at=time.time() - 10)
    await publish(broker, "test/palsd/h1/budget", encode(stale))
    await until(lambda: rejected(registry, "expired") == 1, "expired rejected")
    assert len(sink.calls) == 1
    assert feed.state()["last_reject_reason"] == "expired"


async def test_rejections_counted_and_change_nothing(broker, running, tmp_path):
    key_file = tmp_path / "hmac.key"
    key_file.write_text(KEY.decode() + "\n")
    cfg = feed_config(broker, hmac_key_file=key_file, require_signature=True)
    feed, sink, registry = running(cfg)
    await until(lambda: feed.state()["connected"], "connected")
    topic = "test/palsd/h1/budget"

    def signed(msg: dict[str, Any], key: bytes = KEY, on: str = topic) -> bytes:
        return encode(msg, key, topic=on, kind="budget")

    await publish(broker, topic, signed(budget(5, 4000)))
    await until(lambda: sink.calls, "signed budget")
    bad = [
        (b"{not json", "malformed_json"),
        (encode(budget(6, 4000)), "missing_signature"),
        (signed(budget(6, 4000), b"wrong key"), "bad_signature"),
        # signed for another host's topic: a replay across topics
        (signed(budget(6, 4000), on="test/palsd/h2/budget"), "bad_signature"),
        (signed(budget(6, True)), "wrong_type"),
        (signed(budget(6, 10**9)), "above_max"),
        (signed(budget(4, 1000)), "replayed_seq"),
        (signed(budget(6, 1000, issued_at=time.time() + 600)), "from_the_future"),
        (signed(budget(6, 1000, ttl_s=10**6)), "ttl_too_long"),
    ]
    for payload, _ in bad:
        await publish(broker, topic, payload)
    for _, reason in bad:
        want = sum(1 for _, r in bad if r == reason)
        await until(lambda r=reason, n=want: rejected(registry, r) == n, f"{reason} counted")
    assert len(sink.calls) == 1
    assert feed.state()["messages_total"]["rejected"] == len(bad)
    # the same signed bytes again (a redelivery) are a duplicate, not a rejection
    first = signed(budget(7, 3500))
    await publish(broker, topic, first)
    await publish(broker, topic, first)
    await until(
        lambda: registry.get_sample_value("palsd_mqtt_messages_total", {"kind": "duplicate"}),
        "duplicate counted",
    )
    assert [e.watts for _, e in sink.calls if e] == [4000, 3500]


async def test_broker_killed_and_restarted_budget_held_then_reconnect(broker, running):
    feed, sink, registry = running(feed_config(broker))
    await until(lambda: feed.state()["connected"], "connected")
    await publish(broker, "test/palsd/h1/budget", encode(budget(1, 2000, ttl_s=30)))
    await until(lambda: sink.calls, "budget")
    broker.kill()
    await until(lambda: not feed.state()["connected"], "disconnect noticed")
    assert registry.get_sample_value("palsd_mqtt_connected") == 0
    await asyncio.sleep(0.5)  # several failed reconnects while the broker is gone
    # the feed never withdraws a budget on broker loss: the book holds it until expiry
    assert [e for _, e in sink.calls if e is None] == []
    held = sink.book.in_force(time.time())
    assert (held.effective_w, held.source) == (2000, BudgetSource.FACILITY)
    broker.start()
    await until(lambda: feed.state()["connected"], "reconnected")
    assert (registry.get_sample_value("palsd_mqtt_reconnects_total") or 0) >= 1
    await publish(broker, "test/palsd/h1/budget", encode(budget(2, 1800)))
    await until(lambda: len(sink.calls) == 2, "budget after reconnect")


async def test_status_retained_and_state_online_seen_by_a_late_subscriber(broker, running):
    feed, _, _ = running(feed_config(broker))
    await until(lambda: feed.state()["connected"], "connected")
    await asyncio.sleep(0.3)  # at least one status publication
    got: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
        await sub.subscribe("test/palsd/h1/#")
        async with asyncio.timeout(10):
            async for m in sub.messages:
                if m.retain:
                    got[str(m.topic)] = bytes(m.payload)  # type: ignore[arg-type]
                if {"test/palsd/h1/status", "test/palsd/h1/state"} <= set(got):
                    break
    assert got["test/palsd/h1/state"] == b"online"
    status = json.loads(got["test/palsd/h1/status"])
    assert status["infeasible"] is True
    assert status["budget"]["effective_w"] == 3000


async def test_clean_stop_publishes_offline(broker):
    feed = MqttFeed(feed_config(broker), RecordingSink(), lambda: STATUS, CollectorRegistry())
    task = asyncio.create_task(feed.run())
    await until(lambda: feed.state()["connected"], "connected")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await retained(broker, "test/palsd/h1/state") == b"offline"


async def retained(broker: Broker, topic: str) -> bytes:
    async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
        await sub.subscribe(topic)
        async with asyncio.timeout(10):
            async for m in sub.messages:
                return bytes(m.payload)  # type: ignore[arg-type]
    raise AssertionError("no retained message")


FEED_PROCESS = """
import asyncio, sys
from prometheus_client import CollectorRegistry
from palsd.feed.mqtt import MqttFeed
from palsd.config import MqttConfig

class Sink:
    def facility_budget(self, origin, entry): pass
    def price(self, price, expires_at): pass

cfg = MqttConfig(enabled=True, url=sys.argv[1], host_id="h1", topic_prefix="test/palsd")
asyncio.run(MqttFeed(cfg, Sink(), lambda: {}, CollectorRegistry()).run())
"""


async def test_last_will_offline_when_the_process_is_killed(broker):
    proc = subprocess.Popen(
        [sys.executable, "-c", FEED_PROCESS, broker.url],
        cwd=Path(__file__).resolve().parents[2],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
            await sub.subscribe("test/palsd/h1/state", qos=1)
            seen: list[bytes] = []
            async with asyncio.timeout(20):
                async for m in sub.messages:
                    seen.append(bytes(m.payload))  # type: ignore[arg-type]
                    if seen[-1] == b"online" and proc.poll() is None:
                        # no DISCONNECT packet: the broker must publish the will itself
                        proc.send_signal(signal.SIGKILL)
                    if seen[-1] == b"offline":
                        break
        assert seen[-2:] == [b"online", b"offline"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert await retained(broker, "test/palsd/h1/state") == b"offline"


async def test_sequence_book_survives_a_restart_so_a_replay_is_still_refused(broker, tmp_path):
    seq_path = tmp_path / "state" / "mqtt-seq.json"
    topic = "test/palsd/h1/budget"
    first = encode(budget(7, 2500))

    async def feed_once(payload: bytes, until_what: Callable[[RecordingSink, Any], Any]):
        sink, registry = RecordingSink(), CollectorRegistry()
        feed = MqttFeed(feed_config(broker), sink, lambda: STATUS, registry, seq_path=seq_path)
        task = asyncio.create_task(feed.run())
        try:
            await until(lambda: feed.state()["connected"], "connected")
            await publish(broker, topic, payload)
            await until(lambda: until_what(sink, registry), "the message handled")
            await until(seq_path.exists, "the sequence book on disk")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return sink

    sink = await feed_once(first, lambda s, r: s.calls)
    assert sink.calls[0][1].watts == 2500
    # A restarted daemon: the same sender's seq 7 again, other bytes (a captured-and-edited
    # or an old message) is a replay, not news.
    sink = await feed_once(encode(budget(7, 9000)), lambda s, r: rejected(r, "replayed_seq") == 1)
    assert sink.calls == []


async def test_stop_is_bounded_even_when_the_broker_stops_answering(broker):
    # A broker that hangs (SIGSTOP: the TCP connection stays open, nothing answers) must not
    # hold palsd's stop: "offline" gets 1 s, the DISCONNECT 1 s (STOP_BOUND_S in all).
    from palsd.feed.mqtt import STOP_BOUND_S

    feed = MqttFeed(feed_config(broker), RecordingSink(), lambda: STATUS, CollectorRegistry())
    task = asyncio.create_task(feed.run())
    await until(lambda: feed.state()["connected"], "connected")
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_BOUND_S + 30)
        took_s = time.monotonic() - started
        assert done, "the feed did not stop"
        assert task.cancelled()
        # 5 s of slack for a loaded machine; before the bound, this took aiomqtt's 10 s call
        # timeout (and a swallowed stop never finished at all)
        assert took_s < STOP_BOUND_S + 5
        print(f"feed stopped {took_s:.2f} s after the cancel (bound {STOP_BOUND_S} s)")
    finally:
        broker.proc.send_signal(signal.SIGCONT)


async def test_poison_message_leaves_the_session_up_and_the_next_budget_applies(
    broker, running, tmp_path
):
    key_file = tmp_path / "hmac.key"
    key_file.write_text(KEY.decode())
    poison = f'{{"price_per_mwh":1,"seq":1,"issued_at":{int(time.time())},"sender":"x","sig":"é"}}'
    await publish(broker, "test/palsd/price", poison.encode(), retain=True)
    feed, sink, registry = running(
        feed_config(broker, hmac_key_file=key_file, require_signature=True)
    )
    await until(lambda: rejected(registry, "bad_signature") == 1, "retained poison rejected")
    topic = "test/palsd/h1/budget"
    await publish(broker, topic, encode(budget(1, 2500), KEY, topic=topic))
    await until(lambda: sink.calls, "signed budget after the poison")
    assert sink.calls[0][1] is not None and sink.calls[0][1].watts == 2500
    assert feed.state()["connected"] and feed.state()["reconnects_total"] == 0
    assert registry.get_sample_value("palsd_mqtt_received_total") == 2


def documented_broker_settings() -> str:
    """The mosquitto.conf lines docs/mqtt.md recommends for a broker that serves palsd."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "mqtt.md").read_text()
    after = text.split("set in `mosquitto.conf`", 1)[1]
    block = after.split("```", 2)[1]
    lines = [line.strip() for line in block.splitlines()]
    assert any(line.startswith("max_queued_messages") for line in lines), block
    return "\n".join(lines) + "\n"


async def test_the_documented_broker_settings_start_mosquitto_and_carry_budgets(tmp_path):
    b = Broker(tmp_path / "tuned", extra_config=documented_broker_settings())
    b.start()
    try:
        sink = RecordingSink()
        feed = MqttFeed(feed_config(b), sink, lambda: STATUS, CollectorRegistry())
        task = asyncio.create_task(feed.run())
        try:
            await until(lambda: feed.state()["connected"], "connected")
            await publish(b, "test/palsd/h1/budget", encode(budget(1, 2222)))
            await until(lambda: sink.calls, "budget through the tuned broker")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert "Error" not in b.log_path.read_text()
    finally:
        b.stop()
