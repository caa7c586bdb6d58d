"""Sensing off the tick: one long-lived scrape task per vLLM server, and GPU reads with a deadline.

Rules of this file: the tick only reads what these hold; it never awaits a server. A server's
signals are handed out only while fresh (taken within `stale_after_s`); otherwise the reading
says why they are stale: the scraper's own reason for a failed scrape, or how long a scrape has
been waiting for an answer. A GPU read that misses its deadline is not abandoned (a worker
thread cannot be stopped) but it is never doubled: the next read waits for the same one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from palsd.core.types import GpuObservation, ServerSignals
from palsd.errors import GpuUnavailable
from palsd.sense.gpu import GpuBackend


class SignalSource(Protocol):
    """One scrape of one server (palsd.sense.vllm.VllmScraper): bounded by its own timeout,
    never raises; None with `stale_reason` set when the scrape failed."""

    url: str
    stale_reason: str | None
    restarts: int  # restarts of the server seen on its page since palsd started

    async def poll(self, now_s: float) -> ServerSignals | None: ...


@dataclass(frozen=True)
class SignalsReading:
    """What the tick gets: fresh signals, or None and why not."""

    signals: ServerSignals | None
    stale_reason: str | None
    age_s: float | None  # since the newest signals were taken; None: never


class ServerScraper:
    """Scrapes one server every `period_s` for as long as `run` runs."""

    def __init__(
        self,
        source: SignalSource,
        period_s: float,
        on_failure: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.period_s = period_s  # the daemon updates it on reload
        self._on_failure = on_failure
        self._monotonic = monotonic
        self._signals: ServerSignals | None = None
        self._taken_at: float | None = None
        self._in_flight_since: float | None = None

    @property
    def stale_after_s(self) -> float:
        """Older signals describe a server that may have changed since: three periods, and at
        least a second so a busy machine's jitter is not read as an outage."""
        return max(3.0 * self.period_s, 1.0)

    async def run(self) -> None:
        while True:
            started = self._monotonic()
            await self.scrape()
            await asyncio.sleep(max(0.0, self.period_s - (self._monotonic() - started)))

    async def scrape(self) -> None:
        """One scrape, kept if it worked (the task's step; tests and benchmarks call it)."""
        started = self._monotonic()
        self._in_flight_since = started
        try:
            signals = await self.source.poll(started)
        finally:
            self._in_flight_since = None
        if signals is None:
            if self._on_failure is not None:
                self._on_failure()
        else:
            self._signals, self._taken_at = signals, started

    def latest(self) -> SignalsReading:
        now = self._monotonic()
        age = None if self._taken_at is None else now - self._taken_at
        waiting = self._in_flight_since
        if waiting is not None and now - waiting > self.stale_after_s:
            why = f"no answer from {self.source.url} for {now - waiting:.1f} s"
            return SignalsReading(None, why, age)
        if self.source.stale_reason is not None:  # the newest scrape failed (or none yet)
            return SignalsReading(None, self.source.stale_reason, age)
        if age is None:
            return SignalsReading(None, "not scraped yet", None)
        if age > self.stale_after_s:
            return SignalsReading(None, f"signals are {age:.1f} s old", age)
        return SignalsReading(self._signals, None, age)


class GpuReader:
    """GPU reads in a worker thread, awaited at most `deadline_s`; one read in flight at most."""

    def __init__(self, backend: GpuBackend) -> None:
        self._backend = backend
        self._in_flight: asyncio.Future[list[GpuObservation]] | None = None
        self._started_at = 0.0
        self.started_at = 0.0  # time.monotonic() when the read last returned was started

    async def read(self, deadline_s: float) -> tuple[GpuObservation, ...]:
        """The GPUs as read now (or by a read that started late in the previous tick).
        Raises GpuError, or GpuUnavailable when no answer came within `deadline_s`."""
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self._backend.read_all))
            self._started_at = time.monotonic()
        done, _ = await asyncio.wait({self._in_flight}, timeout=deadline_s)
        if not done:
            waited = time.monotonic() - self._started_at
            raise GpuUnavailable(
                f"GPU read has not answered for {waited:.2f} s (deadline {deadline_s:.2f} s); "
                "holding the last limits"
            )
        future, self._in_flight = self._in_flight, None
        self.started_at = self._started_at
        return tuple(future.result())

    def cancel(self) -> None:
        """At exit: stop waiting (the thread itself finishes on its own)."""
        if self._in_flight is not None:
            self._in_flight.cancel()
            self._in_flight = None
