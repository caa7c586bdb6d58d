"""The MQTT client of the facility feed: connect, subscribe, hand valid budgets to the daemon,
publish status and liveness, reconnect forever. The only module that imports aiomqtt.

Everything it decides about a message is in payload.py and topics.py; this file does the I/O,
the counting and the logging. It never raises out of `run()` on broker trouble: a lost broker
means the budgets already accepted stay in force until they expire (the budget book's rule).
"""

from __future__ import annotations

import asyncio
import json
import os
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

from palsd.config import MqttConfig
from palsd.core.budget import BudgetEntry
from palsd.feed.backoff import backoff_s
from palsd.feed.payload import (
    REASONS,
    BudgetMessage,
    Rejected,
    Rules,
    SeqBook,
    decode_budget,
    decode_price,
)
from palsd.feed.topics import FeedTopics, Kind, Route
from palsd.report.logs import get_logger


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
        self.rejected = Counter(
            "palsd_mqtt_rejected_total", "MQTT messages rejected, by reason", ["reason"], registry=r
        )
        for reason in REASONS:
            self.rejected.labels(reason)  # every reason visible at 0, so alerts can use rate()
        self.messages = Counter(
            "palsd_mqtt_messages_total",
            "MQTT messages accepted (budget, price) or ignored as exact duplicates",
            ["kind"],
            registry=r,
        )
        for kind in ("budget", "price", "duplicate"):
            self.messages.labels(kind)
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
            cfg.topic_prefix, self.host_id, ((g.topic, g.share) for g in cfg.groups)
        )
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
        self._counts = {"budget": 0, "price": 0, "duplicate": 0, "rejected": 0}

    # ---- what the daemon reads ----

    def _load_seqs(self, path: Path) -> SeqBook:
        try:
            return SeqBook.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return SeqBook()
        except (OSError, ValueError) as err:
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
            try:
                await asyncio.to_thread(_write_atomically, self.seq_path, book.to_json())
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
            "reconnects_total": max(0, self._attempts - 1),
        }

    def _budget_age_s(self) -> float:
        if self._last_budget_at is None:
            return float("nan")
        return max(0.0, self.clock() - self._last_budget_at)

    # ---- the connection loop ----

    async def run(self) -> None:
        """Stay connected until cancelled; on any failure log it, back off, try again."""
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
                self._last_error = _describe(err)
                self.log.warning(
                    "mqtt_disconnected",
                    broker=f"{self.host}:{self.port}",
                    error=self._last_error,
                    action="budgets in force are held until they expire; reconnecting",
                )
            finally:
                self._set_connected(False)
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
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.cfg.username,
            password=secrets.password,
            identifier=self.client_id,
            keepalive=self.cfg.keepalive_s,
            will=will,
            tls_context=secrets.tls,
            timeout=10,
            clean_session=True,
        )
        async with client:
            self._set_connected(True)
            self._last_error = None
            await client.publish(self.topics.state, b"online", qos=1, retain=True)
            for topic in self.topics.subscriptions():
                await client.subscribe(topic, qos=1)
            self.log.info(
                "mqtt_connected",
                broker=f"{self.host}:{self.port}",
                client_id=self.client_id,
                subscriptions=self.topics.subscriptions(),
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._receive(client), name="mqtt-receive")
                    tg.create_task(self._publish_status(client), name="mqtt-status")
            except asyncio.CancelledError:
                # A clean stop: say so ourselves, since a clean DISCONNECT suppresses the will.
                await _quietly(client.publish(self.topics.state, b"offline", qos=1, retain=True))
                raise
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            self.handle(str(message.topic), bytes(raw))

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        while True:
            try:
                body = json.dumps(self.status_provider(), default=str, separators=(",", ":"))
            except Exception as err:  # a bad status must not cost the budget feed
                self.log.error("mqtt_status_failed", error=repr(err))
            else:
                await client.publish(self.topics.status, body.encode(), qos=1, retain=True)
            await asyncio.sleep(self.cfg.status_interval_s)

    # ---- one message (sync, on the event loop: a lower budget reaches the sink at once) ----

    def handle(self, topic: str, raw: bytes) -> None:
        now = self.clock()
        route = self.topics.route(topic)
        if route is None:
            self._reject(topic, Rejected("unknown_topic", "not a subscribed topic"))
            return
        if route.kind is Kind.BUDGET:
            decoded: Any = decode_budget(
                raw, now, self.rules, topic=topic, max_budget_w=self.cfg.max_budget_w / route.share
            )
        else:
            decoded = decode_price(raw, now, self.rules, topic=topic)
        if isinstance(decoded, Rejected):
            self._reject(topic, decoded)
            return
        seen = self.seqs.check(route.origin, decoded)
        if isinstance(seen, Rejected):
            self._reject(topic, seen)
            return
        if seen == "duplicate":
            self._count("duplicate")
            self.log.debug("mqtt_duplicate_ignored", topic=topic, seq=decoded.seq)
            return
        self.seqs = self.seqs.accepted(route.origin, decoded)
        self._save_seqs_soon()
        self._last_message_at = now
        self.metrics.last_message_ts.set(now)
        if isinstance(decoded, BudgetMessage):
            self._apply_budget(route, decoded, now)
        else:
            self._count("price")
            self.log.info(
                "mqtt_price_accepted",
                price_per_mwh=decoded.price_per_mwh,
                seq=decoded.seq,
                sender=decoded.sender,
            )
            self.sink.price(decoded.price_per_mwh, decoded.expires_at)

    def _apply_budget(self, route: Route, msg: BudgetMessage, now: float) -> None:
        watts = msg.budget_w * route.share
        entry = BudgetEntry(
            watts=watts,
            expires_at=msg.expires_at,
            reason=msg.reason or f"facility budget from {msg.sender}",
            set_at=now,
            origin=route.origin,
            seq=msg.seq,
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

    def _count(self, kind: str) -> None:
        self._counts[kind] += 1
        self.metrics.messages.labels(kind).inc()

    def _reject(self, topic: str, rejected: Rejected) -> None:
        self._counts["rejected"] += 1
        self._last_reject, self._last_reject_at = rejected, self.clock()
        self.metrics.rejected.labels(rejected.reason).inc()
        self.log.warning(
            "mqtt_message_rejected",
            topic=topic,
            reason=rejected.reason,
            detail=rejected.detail,
            sender=rejected.sender,
            seq=rejected.seq,
            action="ignored; nothing changed",
        )


async def _quietly(coro: Any) -> None:
    try:
        await asyncio.wait_for(coro, timeout=1.0)
    except Exception:
        pass


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"


def _write_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
