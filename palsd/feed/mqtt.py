"""The MQTT client of the facility feed: connect, subscribe, hand valid budgets to the daemon,
publish status and liveness, reconnect forever. The only module that imports aiomqtt.

Everything it decides about a message is in payload.py, signing.py and topics.py; this file does
the I/O, the counting and the logging. Its rules:
- Every message taken off the client's queue ends as exactly one counted outcome: handed over
  (budget, price), ignored (duplicate, superseded) or rejected with a reason. Nothing raised
  while handling a message leaves this file: the session survives any payload.
- Budgets coalesce, never queue: messages already waiting are taken together (at most
  MAX_BATCH per loop iteration, so a flood cannot starve the control loop), and only the newest
  accepted one per topic is handed to the daemon; the older ones are counted as superseded.
- The client's incoming queue is bounded; a message it cannot hold is counted as dropped.
- A stop (cancellation) always finishes within STOP_BOUND_S, whatever the broker does.
It never raises out of `run()` on broker trouble: a lost broker means the budgets already
accepted stay in force until they expire (the budget book's rule).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt
from prometheus_client import CollectorRegistry, Counter, Gauge

from palsd.atomicfile import write_atomic
from palsd.config import MqttConfig
from palsd.core.budget import BudgetEntry
from palsd.feed.backoff import backoff_s
from palsd.feed.payload import (
    REASONS,
    BudgetMessage,
    Message,
    Rejected,
    Rules,
    SeqBook,
    decode_budget,
    decode_price,
)
from palsd.feed.topics import FeedTopics, Kind, Route
from palsd.fleet.host_status import with_fleet
from palsd.fleet.topics import feed_groups, fleet_roles
from palsd.report.logs import LogLimiter, get_logger

# Messages handled per loop iteration at most: 0.1-0.25 ms each (signed), so at most ~15 ms;
# then the loop (the control tick, a budget enforcement) runs before the next batch.
MAX_BATCH = 64
# The client's incoming queue: far above what a keeping-up feed ever holds (it drains in
# batches), small enough that a flood cannot exhaust memory. What does not fit is counted.
MAX_QUEUED = 10_000
# A stop: at most this long for the session's own tasks to honour their cancel, to publish
# "offline", and for the DISCONNECT.
CANCEL_GRACE_S = 0.5
OFFLINE_PUBLISH_S = 1.0
DISCONNECT_S = 1.0
STOP_BOUND_S = CANCEL_GRACE_S + OFFLINE_PUBLISH_S + DISCONNECT_S
# Per-call bound on subscribe and status publish during a session.
CALL_TIMEOUT_S = 10.0
# Feed-level outcome that is not the decoder's: a bug while handling one message. Counted,
# logged with the traceback, and the session carries on.
FEED_REASONS = (*REASONS, "internal_error")
KINDS = ("budget", "price", "duplicate", "superseded")


class BudgetSink(Protocol):
    """What the feed drives; the daemon implements it. Called on the event loop."""

    def facility_budget(self, origin: str, entry: BudgetEntry | None) -> None: ...

    def price(self, price_per_mwh: float, expires_at: float | None) -> None: ...


@dataclass(frozen=True)
class _Secrets:
    password: str | None
    hmac_key: bytes | None
    tls: ssl.SSLContext | None


def _read_text(path: Path | None) -> str | None:
    return None if path is None else path.read_text().strip()


def _load_secrets(cfg: MqttConfig, use_tls: bool) -> _Secrets:
    """File I/O: run in a thread. Re-read at every connect so a fixed file heals the feed."""
    key = _read_text(cfg.hmac_key_file)
    if key is not None and not key:
        raise ValueError(f"mqtt.hmac_key_file {cfg.hmac_key_file} is empty")
    tls = None
    if use_tls:
        tls = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if cfg.cert_file is not None:
            tls.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    return _Secrets(_read_text(cfg.password_file), None if key is None else key.encode(), tls)


class _FeedMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.received = Counter(
            "palsd_mqtt_received_total",
            "MQTT messages taken off the client's queue; each ends in exactly one of "
            "palsd_mqtt_messages_total{kind} or palsd_mqtt_rejected_total{reason}",
            registry=r,
        )
        self.rejected = Counter(
            "palsd_mqtt_rejected_total", "MQTT messages rejected, by reason", ["reason"], registry=r
        )
        for reason in FEED_REASONS:
            self.rejected.labels(reason)  # every reason visible at 0, so alerts can use rate()
        self.messages = Counter(
            "palsd_mqtt_messages_total",
            "MQTT messages handed to the daemon (budget, price) or ignored: the same bytes "
            "again (duplicate), or a newer budget for the same topic in the same batch "
            "(superseded)",
            ["kind"],
            registry=r,
        )
        for kind in KINDS:
            self.messages.labels(kind)
        self.dropped = Counter(
            "palsd_mqtt_dropped_total",
            "MQTT messages dropped before palsd could read them, by reason (queue_full)",
            ["reason"],
            registry=r,
        )
        self.dropped.labels("queue_full")
        self.queued = Gauge(
            "palsd_mqtt_queued_messages", "MQTT messages waiting in the client's queue", registry=r
        )
        self.connected = Gauge(
            "palsd_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.reconnects = Counter(
            "palsd_mqtt_reconnects_total", "connection attempts after the first", registry=r
        )
        self.last_message_ts = Gauge(
            "palsd_mqtt_last_message_timestamp_seconds",
            "unix time of the last accepted MQTT message",
            registry=r,
        )
        self.budget_age_s = Gauge(
            "palsd_facility_budget_age_seconds",
            "seconds since the last accepted facility budget (NaN: none yet)",
            registry=r,
        )


class _Inbox(asyncio.Queue[aiomqtt.Message]):
    """The client's incoming queue (aiomqtt's `queue_type`): bounded, and counts what it drops
    (aiomqtt would only log a warning)."""

    on_drop: Callable[[], None] = staticmethod(lambda: None)

    def put_nowait(self, item: aiomqtt.Message) -> None:
        try:
            super().put_nowait(item)
        except asyncio.QueueFull:
            self.on_drop()
            raise


class MqttFeed:
    def __init__(
        self,
        cfg: MqttConfig,
        sink: BudgetSink,
        status_provider: Callable[[], dict[str, Any]],
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
        seq_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        # Where the sequence book survives a restart, so an old (unexpired) message replayed
        # to a restarted daemon is still refused. None: in memory only.
        self.seq_path = seq_path
        self._seq_save: asyncio.Task[None] | None = None
        self.sink = sink
        self.status_provider = status_provider
        self.clock = clock
        self.log = get_logger("palsd.mqtt")
        url = urlsplit(cfg.url)
        self.use_tls = url.scheme == "mqtts"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.use_tls else 1883)
        self.host_id = cfg.host_id or socket.gethostname().split(".")[0]
        self.topics = FeedTopics.build(
            cfg.topic_prefix, self.host_id, feed_groups(cfg.groups, self.host_id)
        )
        self.fleet_roles = fleet_roles(cfg.topic_prefix, cfg.groups, self.host_id)
        self.client_id = cfg.client_id or f"palsd-{self.host_id}"
        self.metrics = _FeedMetrics(registry)
        self.metrics.budget_age_s.set_function(self._budget_age_s)
        self.seqs = SeqBook()
        self.rules = Rules(cfg.max_budget_w, cfg.max_ttl_s, cfg.max_clock_skew_s)
        self._connected = False
        self._attempts = 0
        self._last_message_at: float | None = None
        self._last_budget_at: float | None = None
        self._last_reject: Rejected | None = None
        self._last_reject_at: float | None = None
        self._last_error: str | None = None
        self._counts = {k: 0 for k in (*KINDS, "rejected")}
        self._received = 0
        self._dropped = 0
        self._queue_len: Callable[[], int] = lambda: 0
        self.metrics.queued.set_function(lambda: self._queue_len())
        self._reject_log = LogLimiter(burst=20, window_s=10.0)

    # ---- what the daemon reads ----

    def _load_seqs(self, path: Path) -> SeqBook:
        try:
            return SeqBook.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return SeqBook()
        except Exception as err:  # OSError, bad JSON, too deep, not what to_json wrote
            # Refuse nothing and trust nothing stale: start empty, but say so loudly.
            self.log.error("mqtt_seq_record_unreadable", path=str(path), error=str(err))
            return SeqBook()

    def _save_seqs_soon(self) -> None:
        """Write the book after the budget is handed over, off the loop, one write at a time
        (a burst of messages costs one write of the latest book, not one per message)."""
        if self.seq_path is None or (self._seq_save is not None and not self._seq_save.done()):
            return
        self._seq_save = asyncio.get_running_loop().create_task(self._save_seqs())

    async def _save_seqs(self) -> None:
        assert self.seq_path is not None
        while True:
            book = self.seqs
            data = json.dumps(book.to_json()).encode()
            try:
                await asyncio.to_thread(_write_book, self.seq_path, data)
            except OSError as err:
                self.log.error(
                    "mqtt_seq_record_write_failed", path=str(self.seq_path), error=str(err)
                )
                return
            if self.seqs is book:  # nothing newer arrived while writing
                return

    def state(self) -> dict[str, Any]:
        r = self._last_reject
        return {
            "connected": self._connected,
            "broker": f"{self.host}:{self.port}",
            "tls": self.use_tls,
            "client_id": self.client_id,
            "subscriptions": self.topics.subscriptions(),
            "last_message_at": self._last_message_at,
            "last_budget_at": self._last_budget_at,
            "last_reject_reason": None if r is None else r.reason,
            "last_reject_detail": None if r is None else r.detail,
            "last_reject_at": self._last_reject_at,
            "last_error": self._last_error,
            "messages_total": dict(self._counts),
            "received_total": self._received,
            "dropped_total": self._dropped,
            "reconnects_total": max(0, self._attempts - 1),
        }

    def _budget_age_s(self) -> float:
        if self._last_budget_at is None:
            return float("nan")
        return max(0.0, self.clock() - self._last_budget_at)

    # ---- the connection loop ----

    async def run(self) -> None:
        """Stay connected until cancelled; on any failure log it, back off, try again.
        Cancelled, it returns (by raising CancelledError) within STOP_BOUND_S, whatever the
        broker and the client library do: the loop runs in its own task, and a loop that has
        not finished its clean stop by then is left to finish on its own."""
        loop_task = asyncio.create_task(self._run(), name="mqtt-feed-loop")
        try:
            await asyncio.shield(loop_task)
        except asyncio.CancelledError:
            loop_task.cancel()
            done, _ = await asyncio.wait({loop_task}, timeout=STOP_BOUND_S)
            if not done:
                loop_task.add_done_callback(_consume)
                self.log.warning(
                    "mqtt_stop_slow",
                    bound_s=STOP_BOUND_S,
                    action="stopping without waiting for the broker",
                )
            self._set_connected(False)
            raise

    async def _run(self) -> None:
        if self.seq_path is not None:
            self.seqs = await asyncio.to_thread(self._load_seqs, self.seq_path)
        failures = 0
        while True:
            self._attempts += 1
            if self._attempts > 1:
                self.metrics.reconnects.inc()
            try:
                await self._session()
                failures = 0  # the broker went away after a good session: retry soon
            except asyncio.CancelledError:
                raise
            except Exception as err:  # broker loss, refused, TLS, bad files: all retried
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from err  # a stop, whatever else went wrong
                self._last_error = _describe(err)
                self.log.warning(
                    "mqtt_disconnected",
                    broker=f"{self.host}:{self.port}",
                    error=self._last_error,
                    action="budgets in force are held until they expire; reconnecting",
                )
            finally:
                self._set_connected(False)
                self._queue_len = lambda: 0
            delay = backoff_s(
                failures, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, random.random()
            )
            failures += 1
            await asyncio.sleep(delay)

    def _set_connected(self, up: bool) -> None:
        self._connected = up
        self.metrics.connected.set(1 if up else 0)

    async def _session(self) -> None:
        secrets = await asyncio.to_thread(_load_secrets, self.cfg, self.use_tls)
        self.rules = Rules(
            self.cfg.max_budget_w,
            self.cfg.max_ttl_s,
            self.cfg.max_clock_skew_s,
            self.cfg.require_signature,
            secrets.hmac_key,
        )
        will = aiomqtt.Will(self.topics.state, b"offline", qos=1, retain=True)
        inbox = type("Inbox", (_Inbox,), {"on_drop": staticmethod(self._count_dropped)})
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.cfg.username,
            password=secrets.password,
            identifier=self.client_id,
            keepalive=self.cfg.keepalive_s,
            will=will,
            tls_context=secrets.tls,
            timeout=CALL_TIMEOUT_S,
            clean_session=True,
            queue_type=inbox,
            max_queued_incoming_messages=MAX_QUEUED,
        )
        stopping = False
        try:
            async with client:
                self._set_connected(True)
                self._queue_len = lambda: len(client.messages)
                self._last_error = None
                try:
                    await client.publish(self.topics.state, b"online", qos=1, retain=True)
                    for topic in self.topics.subscriptions():
                        await client.subscribe(topic, qos=1)
                    self.log.info(
                        "mqtt_connected",
                        broker=f"{self.host}:{self.port}",
                        client_id=self.client_id,
                        subscriptions=self.topics.subscriptions(),
                    )
                    await _first_failure(
                        asyncio.create_task(self._receive(client), name="mqtt-receive"),
                        asyncio.create_task(self._publish_status(client), name="mqtt-status"),
                    )
                except asyncio.CancelledError:
                    # A clean stop: say so ourselves, since a clean DISCONNECT suppresses the will;
                    # then a short DISCONNECT, so a silent broker cannot hold the stop.
                    try:
                        # aiomqtt's own timeout, not a wait_for around it: cancelling its inner
                        # wait was seen to take its whole 10 s call timeout on CPython 3.11.
                        await client.publish(
                            self.topics.state,
                            b"offline",
                            qos=1,
                            retain=True,
                            timeout=OFFLINE_PUBLISH_S,
                        )
                    except Exception:
                        pass  # best effort: the broker may be gone; the will covers that
                    client.timeout = DISCONNECT_S
                    stopping = True
                    raise
        except Exception as err:
            if stopping:
                # The DISCONNECT failed or timed out on the way out: still a stop, not a
                # broker failure to reconnect from.
                raise asyncio.CancelledError from err
            raise

    async def _receive(self, client: aiomqtt.Client) -> None:
        batch: list[tuple[str, bytes]] = []
        async for message in client.messages:
            batch.append((str(message.topic), _payload_bytes(message.payload)))
            if len(batch) < MAX_BATCH and len(client.messages) > 0:
                continue  # more already waiting: take them together, hand over the newest
            self.handle_batch(batch)
            batch = []

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        while True:
            try:
                status = with_fleet(self.status_provider(), self.sink, self.clock())
                body = json.dumps(status, default=str, separators=(",", ":"))
            except Exception as err:  # a bad status must not cost the budget feed
                self.log.error("mqtt_status_failed", error=repr(err))
            else:
                await client.publish(self.topics.status, body.encode(), qos=1, retain=True)
            await asyncio.sleep(self.cfg.status_interval_s)

    # ---- messages (sync, on the event loop: a lower budget reaches the sink at once) ----

    def handle(self, topic: str, raw: bytes) -> None:
        """One message on its own (a batch of one)."""
        self.handle_batch([(topic, raw)])

    def handle_batch(self, messages: list[tuple[str, bytes]]) -> None:
        """Check every message in arrival order (the sequence book sees each), then hand the
        daemon only the newest accepted one per topic; the others were superseded."""
        now = self.clock()
        newest: dict[str, tuple[Route, Message]] = {}
        superseded: dict[str, list[int]] = {}  # origin -> seqs passed over
        for topic, raw in messages:
            self._received += 1
            self.metrics.received.inc()
            try:
                admitted = self._admit(topic, raw, now)
            except Exception as err:  # a bug, not a bad message: count it, keep the session
                self._reject(topic, Rejected("internal_error", _describe(err)))
                self.log.exception("mqtt_message_internal_error", topic=topic)
                continue
            if admitted is None:
                continue
            route, msg = admitted
            older = newest.get(route.origin)
            if older is not None:
                self._count("superseded")
                superseded.setdefault(route.origin, []).append(older[1].seq)
            newest[route.origin] = (route, msg)
        for origin, seqs in superseded.items():
            # One line per topic and batch, not one per message: a flood must not flood the log.
            self.log.info(
                "mqtt_budgets_superseded",
                topic=origin,
                count=len(seqs),
                seqs=[seqs[0], seqs[-1]],
                kept_seq=newest[origin][1].seq,
                action="only the newest of a batch is handed over",
            )
        if not newest:
            return
        self._save_seqs_soon()
        self._last_message_at = now
        self.metrics.last_message_ts.set(now)
        for route, msg in newest.values():
            try:
                self._deliver(route, msg, now)
            except Exception as err:  # the daemon's bug must not cost the feed its session
                self.log.exception(
                    "mqtt_handover_failed", topic=route.origin, seq=msg.seq, error=_describe(err)
                )

    def _admit(self, topic: str, raw: bytes, now: float) -> tuple[Route, Message] | None:
        """Decode and sequence-check one message; count and log it if it goes no further."""
        route = self.topics.route(topic)
        if route is None:
            self._reject(topic, Rejected("unknown_topic", "not a subscribed topic"))
            return None
        decoded: Message | Rejected
        if route.kind is Kind.BUDGET:
            decoded = decode_budget(
                raw, now, self.rules, topic=topic, max_budget_w=self.cfg.max_budget_w / route.share
            )
        else:
            decoded = decode_price(raw, now, self.rules, topic=topic)
        if isinstance(decoded, Rejected):
            self._reject(topic, decoded)
            return None
        seen = self.seqs.check(route.origin, decoded)
        if isinstance(seen, Rejected):
            self._reject(topic, seen)
            return None
        if seen == "duplicate":
            self._count("duplicate")
            self.log.debug("mqtt_duplicate_ignored", topic=topic, seq=decoded.seq)
            return None
        self.seqs = self.seqs.accepted(route.origin, decoded)
        return route, decoded

    def _deliver(self, route: Route, msg: Message, now: float) -> None:
        if isinstance(msg, BudgetMessage):
            self._apply_budget(route, msg, now)
            return
        self._count("price")
        self.log.info(
            "mqtt_price_accepted", price_per_mwh=msg.price_per_mwh, seq=msg.seq, sender=msg.sender
        )
        self.sink.price(msg.price_per_mwh, msg.expires_at)

    def _apply_budget(self, route: Route, msg: BudgetMessage, now: float) -> None:
        watts = msg.budget_w * route.share
        entry = BudgetEntry(
            watts=watts,
            expires_at=msg.expires_at,
            reason=msg.reason or f"facility budget from {msg.sender}",
            set_at=now,
            origin=route.origin,
            seq=msg.seq,
            fleet=self.fleet_roles.get(route.origin),
        )
        self._count("budget")
        self._last_budget_at = now
        # Hand over first, log after: the daemon enforces a lower budget inside this call.
        self.sink.facility_budget(route.origin, entry)
        self.log.info(
            "mqtt_budget_accepted",
            origin=route.origin,
            budget_w=watts,
            sent_w=msg.budget_w,
            share=route.share,
            seq=msg.seq,
            sender=msg.sender,
            expires_at=msg.expires_at,
        )

    def _count_dropped(self) -> None:
        self._dropped += 1
        self.metrics.dropped.labels("queue_full").inc()
        if self._dropped == 1 or self._dropped % 1000 == 0:
            self.log.error(
                "mqtt_queue_full",
                dropped_total=self._dropped,
                queued=MAX_QUEUED,
                action="message dropped unread; palsd is not keeping up with the broker",
            )

    def _count(self, kind: str) -> None:
        self._counts[kind] += 1
        self.metrics.messages.labels(kind).inc()

    def _reject(self, topic: str, rejected: Rejected) -> None:
        self._counts["rejected"] += 1
        self._last_reject, self._last_reject_at = rejected, self.clock()
        self.metrics.rejected.labels(rejected.reason).inc()
        # Every rejection is counted; the log is rate-limited per reason, so a hostile flood
        # cannot flood the journal too.
        suppressed = self._reject_log.allow(rejected.reason, time.monotonic())
        if suppressed is None:
            return
        self.log.warning(
            "mqtt_message_rejected",
            topic=topic,
            reason=rejected.reason,
            detail=rejected.detail,
            sender=rejected.sender,
            seq=rejected.seq,
            suppressed_since_last=suppressed,
            action="ignored; nothing changed",
        )


async def _first_failure(*tasks: asyncio.Task[None]) -> None:
    """Run the session's tasks until one ends; cancel and await the others; raise its error.

    Not a TaskGroup, on purpose: in CPython 3.11 a TaskGroup whose child fails while a stop
    (cancellation) is arriving raises the child's error and swallows the stop, and the feed
    would then reconnect forever instead of stopping (issue 12: SIGTERM hung > 30 s)."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Bounded: seen here, a status publish waiting for a PUBACK from a hung broker took
        # aiomqtt's whole call timeout (10 s) to honour its cancel. One that is slow to end
        # is left to end on its own (the client's timeouts end it); its error is consumed.
        _, slow = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
        for task in slow:
            task.add_done_callback(_consume)
    for task in done:
        if not task.cancelled() and (err := task.exception()) is not None:
            raise err
    raise ConnectionError("the MQTT session ended")


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"


def _write_book(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
