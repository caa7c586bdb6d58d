"""`palsd coordinator`: the fleet coordinator of one group over MQTT. The I/O shell around the
state machine in protocol.py: it decodes what arrives, pushes it in, publishes what comes out.

Rules of this file: every message ends as one counted outcome (accepted, or rejected with a
reason); a bad message changes nothing; the broker's loss is retried forever with jittered
backoff, and while it is gone nothing is sent (hosts fall back by themselves, safely).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from palsd.feed.backoff import backoff_s
from palsd.feed.payload import Rejected, Rules, SeqBook, decode_budget
from palsd.feed.signing import signed_message
from palsd.fleet.config import CoordinatorConfig
from palsd.fleet.protocol import BadReport, Coordinator, Params, Round, Send, decode_report
from palsd.fleet.topics import alloc_topic, budget_topic, coordinator_topic, host_status_topic
from palsd.report.logs import get_logger

MAX_STATUS_BYTES = 1_000_000
BATCH_S = 0.02  # after a wake-up, gather what else arrives this long before a round
SUBSCRIBE_BATCH = 100
STATUS_EVERY_S = 2.0  # the coordinator's own retained status (O(members) to build and send)
REJECT_REASONS = (
    "malformed_json",
    "too_large",
    "not_an_object",
    "no_fleet_section",
    "not_a_member",
    "wrong_type",
    "out_of_range",
    "bad_budget",
    "replayed_seq",
    "unknown_topic",
)


class CoordinatorMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.connected = Gauge("palsd_coordinator_connected", "1 while connected", registry=r)
        self.group_budget_w = Gauge(
            "palsd_coordinator_group_budget_w", "the group budget in use (NaN: none)", registry=r
        )
        self.allocation_w = Gauge(
            "palsd_coordinator_allocation_w", "the last allocation sent", ["host"], registry=r
        )
        self.may_hold_w = Gauge(
            "palsd_coordinator_may_hold_w",
            "ledger: the most each host may hold now (NaN: unknown, warming up)",
            ["host"],
            registry=r,
        )
        self.unmet_w = Gauge(
            "palsd_coordinator_unmet_demand_w", "demand above the allocation", ["host"], registry=r
        )
        self.unmet_total_w = Gauge(
            "palsd_coordinator_unmet_demand_total_w", "sum of unmet demand", registry=r
        )
        self.hosts_stale = Gauge(
            "palsd_coordinator_hosts_stale", "members whose status is missing or old", registry=r
        )
        self.raise_blocked = Gauge(
            "palsd_coordinator_raise_blocked",
            "hosts whose raise waits for others to come down",
            registry=r,
        )
        self.committed_w = Gauge(
            "palsd_coordinator_may_hold_total_w", "sum of the ledger (<= group budget)", registry=r
        )
        self.sent = Counter(
            "palsd_coordinator_allocations_sent_total", "allocations published", registry=r
        )
        self.messages = Counter(
            "palsd_coordinator_messages_total", "accepted messages", ["kind"], registry=r
        )
        for kind in ("group_budget", "status", "own_allocation", "duplicate"):
            self.messages.labels(kind)
        self.rejected = Counter(
            "palsd_coordinator_rejected_total", "rejected messages", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.round_s = Histogram(
            "palsd_coordinator_round_seconds",
            "time to plan and publish one round",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )


def _load_secrets(cfg: CoordinatorConfig, use_tls: bool) -> tuple[str | None, bytes | None, Any]:
    m = cfg.mqtt
    password = None if m.password_file is None else m.password_file.read_text().strip()
    key = None if m.hmac_key_file is None else m.hmac_key_file.read_text().strip().encode()
    if key is not None and not key:
        raise ValueError(f"mqtt.hmac_key_file {m.hmac_key_file} is empty")
    tls = None
    if use_tls:
        tls = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
        if m.cert_file is not None:
            tls.load_cert_chain(str(m.cert_file), str(m.key_file) if m.key_file else None)
    return password, key, tls


class CoordinatorService:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.log = get_logger("palsd.coordinator")
        a = cfg.allocation
        params = Params(
            a.ttl_s, a.refresh_s, a.stale_after_s, a.min_change_w, a.peers, a.host_hold_s
        )
        self.core = Coordinator(
            cfg.coordinator_id, {m.host_id: m.share for m in cfg.members}, clock(), params
        )
        prefix = cfg.mqtt.topic_prefix.rstrip("/")
        self.prefix = prefix
        self.group_topic = budget_topic(prefix, cfg.group)
        self.status_topics = {host_status_topic(prefix, m.host_id): m.host_id for m in cfg.members}
        self.alloc_topics = {
            m.host_id: alloc_topic(prefix, cfg.group, cfg.coordinator_id, m.host_id)
            for m in cfg.members
        }
        self.own_alloc = {t: h for h, t in self.alloc_topics.items()}
        self.own_status_topic = coordinator_topic(prefix, cfg.group, cfg.coordinator_id, "status")
        self.state_topic = coordinator_topic(prefix, cfg.group, cfg.coordinator_id, "state")
        url = urlsplit(cfg.mqtt.url)
        self.use_tls = url.scheme == "mqtts"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.use_tls else 1883)
        self.registry = registry or CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.metrics.group_budget_w.set(float("nan"))
        self.rules = Rules(cfg.mqtt.max_budget_w, cfg.mqtt.max_ttl_s, cfg.mqtt.max_clock_skew_s)
        self.key: bytes | None = None
        self.seqs = SeqBook()
        self.last_round: Round | None = None
        self.connected = False
        self._wake: asyncio.Event | None = None
        self.rejected_total = 0

    # ---- messages in (sync, on the loop) ----

    def handle(self, topic: str, raw: bytes) -> None:
        now = self.clock()
        if topic == self.group_topic:
            self._group_budget(topic, raw, now)
        elif topic in self.status_topics:
            self._status(self.status_topics[topic], raw, now)
        elif topic in self.own_alloc:
            self._own_allocation(self.own_alloc[topic], raw)
        else:
            self._reject(topic, "unknown_topic", "not a subscribed topic")

    def _group_budget(self, topic: str, raw: bytes, now: float) -> None:
        msg = decode_budget(raw, now, self.rules, topic=topic)
        if isinstance(msg, Rejected):
            self._reject(topic, "bad_budget", f"{msg.reason}: {msg.detail}")
            return
        seen = self.seqs.check(topic, msg)
        if isinstance(seen, Rejected):
            self._reject(topic, "replayed_seq", seen.detail)
            return
        if seen == "duplicate":
            self.metrics.messages.labels("duplicate").inc()
            return
        self.seqs = self.seqs.accepted(topic, msg)
        before = self.core.group_w
        self.core.on_group_budget(msg.budget_w)
        self.metrics.messages.labels("group_budget").inc()
        self.metrics.group_budget_w.set(msg.budget_w)
        self.log.info(
            "group_budget_accepted",
            group_budget_w=msg.budget_w,
            previous_w=before,
            seq=msg.seq,
            sender=msg.sender,
            expires_at=msg.expires_at,
        )
        self._poke()

    def _status(self, host_id: str, raw: bytes, now: float) -> None:
        if len(raw) > MAX_STATUS_BYTES:
            self._reject(host_id, "too_large", f"{len(raw)} bytes")
            return
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            self._reject(host_id, "malformed_json", str(err)[:200])
            return
        try:
            report = decode_report(doc, host_id, self.group_topic, self.cfg.coordinator_id, now)
        except BadReport as err:
            self._reject(host_id, err.reason, err.detail)
            return
        self.core.on_report(report)
        self.metrics.messages.labels("status").inc()
        self._poke()

    def _own_allocation(self, host_id: str, raw: bytes) -> None:
        try:
            seq = json.loads(raw).get("seq")
        except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
            return  # not ours to judge: hosts check it
        if isinstance(seq, int) and not isinstance(seq, bool):
            self.core.on_own_allocation(host_id, seq)
            self.metrics.messages.labels("own_allocation").inc()

    def _reject(self, where: str, reason: str, detail: str) -> None:
        self.rejected_total += 1
        self.metrics.rejected.labels(reason).inc()
        self.log.warning(
            "coordinator_message_rejected",
            source=where,
            reason=reason,
            detail=detail,
            action="ignored; nothing changed",
        )

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ---- rounds ----

    def payload(self, send: Send) -> bytes:
        fields = {
            "budget_w": send.watts,
            "seq": send.seq,
            "issued_at": round(send.issued_at, 3),
            "ttl_s": round(send.expires_at - send.issued_at, 3),
            "sender": self.cfg.coordinator_id,
            "reason": f"fleet allocation of a {send.group_budget_w:.0f} W group budget",
        }
        topic = self.alloc_topics[send.host_id]
        if self.key is not None:
            return signed_message(self.key, topic, "budget", fields)
        return json.dumps(fields, separators=(",", ":")).encode()

    def round(self, now: float) -> Round:
        r = self.core.plan(now)
        self.last_round = r
        m = self.metrics
        for h, w in r.may_hold_w.items():
            m.may_hold_w.labels(h).set(w if math.isfinite(w) else float("nan"))
        for s in r.sends:
            m.allocation_w.labels(s.host_id).set(s.watts)
        if r.allocation is not None:
            for h, w in r.allocation.unmet_w.items():
                m.unmet_w.labels(h).set(w)
            m.unmet_total_w.set(r.allocation.unmet_total_w)
        m.hosts_stale.set(len(r.stale))
        m.raise_blocked.set(len(r.raise_blocked))
        total = math.fsum(r.may_hold_w.values())
        m.committed_w.set(total if math.isfinite(total) else float("nan"))
        return r

    def status(self) -> dict[str, Any]:
        out = self.core.status(self.clock(), self.last_round)
        out["connected"] = self.connected
        out["group_topic"] = self.group_topic
        out["rejected_total"] = self.rejected_total
        return out

    async def _rounds(self, client: aiomqtt.Client) -> None:
        assert self._wake is not None
        last_status = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.allocation.round_s)
                await asyncio.sleep(BATCH_S)
            except TimeoutError:
                pass
            self._wake.clear()
            started = time.perf_counter()
            now = self.clock()
            r = self.round(now)
            if r.sends:
                await asyncio.gather(
                    *(
                        client.publish(self.alloc_topics[s.host_id], self.payload(s), 1, True)
                        for s in r.sends
                    )
                )
                self.metrics.sent.inc(len(r.sends))
                self.log.debug("allocations_sent", count=len(r.sends))
            if now - last_status >= STATUS_EVERY_S:
                body = json.dumps(self.status(), separators=(",", ":"), default=str).encode()
                await client.publish(self.own_status_topic, body, 1, True)
                last_status = now
            self.metrics.round_s.observe(time.perf_counter() - started)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            try:
                self.handle(str(message.topic), bytes(raw))
            except Exception as err:  # one bad message must not end the session
                self._reject(str(message.topic), "wrong_type", f"internal: {err!r}")

    # ---- the connection ----

    async def run(self) -> None:
        self._wake = asyncio.Event()
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.log.warning(
                    "coordinator_disconnected",
                    broker=f"{self.host}:{self.port}",
                    error=f"{type(err).__name__}: {err}",
                    action="hosts keep their allocations until they expire; reconnecting",
                )
            finally:
                self.connected = False
                self.metrics.connected.set(0)
            delay = backoff_s(
                failures,
                self.cfg.mqtt.reconnect_min_s,
                self.cfg.mqtt.reconnect_max_s,
                random.random(),
            )
            failures += 1
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        password, key, tls = await asyncio.to_thread(_load_secrets, self.cfg, self.use_tls)
        self.key = key
        m = self.cfg.mqtt
        self.rules = Rules(
            m.max_budget_w, m.max_ttl_s, m.max_clock_skew_s, m.require_signature, key
        )
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=m.username,
            password=password,
            identifier=m.client_id or f"palsd-coordinator-{self.cfg.coordinator_id}",
            keepalive=m.keepalive_s,
            will=aiomqtt.Will(self.state_topic, b"offline", qos=1, retain=True),
            tls_context=tls,
            timeout=10,
            clean_session=True,
        )
        async with client:
            self.connected = True
            self.metrics.connected.set(1)
            await client.publish(self.state_topic, b"online", qos=1, retain=True)
            topics = [self.group_topic, *self.status_topics, *self.own_alloc]
            for i in range(0, len(topics), SUBSCRIBE_BATCH):
                await client.subscribe([(t, 1) for t in topics[i : i + SUBSCRIBE_BATCH]])
            self.log.info(
                "coordinator_connected",
                broker=f"{self.host}:{self.port}",
                group=self.group_topic,
                members=len(self.status_topics),
            )
            tasks = [
                asyncio.create_task(self._receive(client), name="coordinator-receive"),
                asyncio.create_task(self._rounds(client), name="coordinator-rounds"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            except asyncio.CancelledError:
                try:
                    await asyncio.wait_for(
                        client.publish(self.state_topic, b"offline", qos=1, retain=True), 1.0
                    )
                except Exception:
                    pass
                raise
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.wait(tasks, timeout=1.0)
