"""One server's batch limit, reconciled: a long-lived task that reads what the server holds
(GET), writes what palsd wants (PUT) when the two differ, and knows whether it can.

Rules of this file:
- The limit palsd reports is the one the server last answered with, never a wish; after a
  failed call it is unknown (None).
- A limit is written only while batch control is OK, after the server's own limit has been
  read, and once that original is on disk (`record_original` answered True).
- A server found holding another limit than the one palsd last set (it restarted, or someone
  else set it) is set back, and the correction is logged as `batch_limit_corrected`.
- A change of batch control is logged once (a warning when it leaves OK), not every poll; while
  it is not OK the endpoint is polled with exponential backoff (1 s doubling to 30 s). While OK
  it is read every `poll_s` (slow: a limit changes rarely), and at once on `retry_soon`.
- One call at a time per server, each bounded by the client's timeout; the tick never waits on
  any of it: it reads `view()` and says what it wants with `want()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from palsd.act.batch import BatchLimitError, BatchLimitRejected, BatchLimitState
from palsd.core.types import BatchControl
from palsd.report.metrics import Metrics

BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0


class BatchPort(Protocol):
    """The admin endpoint (palsd.act.batch.BatchLimitClient); raises BatchLimitError."""

    async def get(self) -> BatchLimitState: ...

    async def set(self, limit: int) -> BatchLimitState: ...


@dataclass(frozen=True)
class BatchView:
    """What the tick may know of one server's batch limit."""

    control: BatchControl
    limit: int | None  # as the server last reported it; None unless control is OK
    max_num_seqs: int | None
    reason: str | None  # why control is not OK


class BatchActuator:
    def __init__(
        self,
        name: str,
        url: str,
        port: BatchPort,
        *,
        log: Any,
        metrics: Metrics,
        record_original: Callable[[str, str, int], bool],
        dry_run: bool,
        poll_s: float,
        min_limit: int = 1,
        max_limit: int | None = None,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.name = name
        self.url = url
        self.port = port
        self.poll_s = poll_s  # while OK; the daemon updates it on reload
        self.dry_run = dry_run
        self._log = log
        self._metrics = metrics
        self._record_original = record_original
        self._min_limit = min_limit
        self._max_limit = max_limit
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._backoff_s = 0.0
        self._view = BatchView(BatchControl.UNKNOWN, None, None, "not read yet")
        self._wanted: int | None = None
        self._set_limit: int | None = None  # what palsd last set and the server confirmed
        self._refused: int | None = None  # refused by the server: not retried until want changes
        self._would: int | None = None  # dry run: the last would-be limit logged
        self._wake = asyncio.Event()

    # ---- called by the tick, on the loop; no I/O ----

    def view(self) -> BatchView:
        return self._view

    def want(self, limit: int | None) -> None:
        """The limit the controller wants (None: no opinion). Written as soon as it can be."""
        if limit != self._wanted:
            self._wanted = limit
            self._refused = None
            if self._write_needed() is not None:
                self._wake.set()

    def retry_soon(self) -> None:
        """The server answers again (its metrics came back) or restarted (its page says so):
        ask now, not after the backoff or the slow poll, since a restarted server holds its
        own limit again."""
        if self._view.control not in (BatchControl.OK, BatchControl.UNKNOWN):
            self._backoff_s = 0.0
        self._wake.set()

    @property
    def wanted(self) -> int | None:
        return self._wanted

    # ---- the task ----

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._pause_s())

    async def step(self) -> None:
        """One call: the write that is due, else a read (the task's step; tests call it)."""
        target = self._write_needed()
        if target is None:
            await self._read()
        else:
            await self._write(target)

    def _pause_s(self) -> float:
        if self._view.control in (BatchControl.OK, BatchControl.UNKNOWN):
            return self.poll_s
        return self._backoff_s

    def _write_needed(self) -> int | None:
        """The limit to write now, or None when nothing is to be written."""
        v = self._view
        if v.control is not BatchControl.OK or v.limit is None or self._wanted is None:
            return None
        top = v.max_num_seqs if v.max_num_seqs is not None else self._wanted
        if self._max_limit is not None:
            top = min(top, self._max_limit)
        target = max(self._min_limit, min(self._wanted, top))
        if target == v.limit or target == self._refused:
            return None
        if self.dry_run and target == self._would:
            return None
        return target

    async def _read(self) -> None:
        try:
            state = await self.port.get()
        except BatchLimitError as err:
            self._metrics.sense_errors.labels(f"batch:{self.name}").inc()
            self._failed(err)
            return
        self._answered(state)
        if self._write_needed() is not None:
            self._wake.set()  # found at another limit than wanted: set it now, not next poll

    async def _write(self, target: int) -> None:
        found = self._view.limit
        assert found is not None  # _write_needed checked it
        if self.dry_run:
            self._would = target
            self._log.info("would_set_batch_limit", server=self.name, limit=target, dry_run=True)
            return
        if not self._record_original(self.name, self.url, found):
            return  # not on disk: changing it now could not be undone; retried next poll
        try:
            state = await self.port.set(target)
        except BatchLimitError as err:
            self._metrics.actuation_errors.labels("batch", type(err).__name__).inc()
            self._log.error(
                "batch_limit_write_failed", server=self.name, limit=target, error=str(err)
            )
            if isinstance(err, BatchLimitRejected):
                self._refused = target
            else:
                self._failed(err)
            return
        if self._set_limit is not None and found != self._set_limit:
            self._log.warning(
                "batch_limit_corrected",
                server=self.name,
                found=found,
                limit=state.limit,
                set_before=self._set_limit,
                why="the server held another limit than palsd set (restarted, or set by hand)",
            )
        else:
            self._log.info("batch_limit_applied", server=self.name, limit=state.limit, was=found)
        self._set_limit = state.limit
        self._answered(state)

    def _answered(self, state: BatchLimitState) -> None:
        self._backoff_s = 0.0
        self._change(BatchView(BatchControl.OK, state.limit, state.max_num_seqs, None))

    def _failed(self, err: BatchLimitError) -> None:
        self._backoff_s = min(self._backoff_max_s, max(self._backoff_min_s, 2 * self._backoff_s))
        self._change(BatchView(err.control, None, None, str(err)))

    def _change(self, view: BatchView) -> None:
        was = self._view.control
        self._view = view
        if view.control is was:
            return
        if view.control is BatchControl.OK:
            level = self._log.info if was is BatchControl.UNKNOWN else self._log.warning
            level("batch_control_changed", server=self.name, state="ok", was=was.value)
        else:
            self._log.warning(
                "batch_control_changed",
                server=self.name,
                state=view.control.value,
                was=was.value,
                reason=view.reason,
                action=f"cap-only; asking again in {self._backoff_s:g} s, backing off to "
                f"{self._backoff_max_s:g} s",
            )
