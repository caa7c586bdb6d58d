"""The daemon: the one owner of every background task, and a tick that only sequences
sense -> decide -> act -> report.

Rules of this file:
- Every task (scrapers, batch actuators, budget enforcement, the tick, and what the caller
  spawns: API, metrics, MQTT feed) runs in the one TaskGroup this async context manager owns.
  Leaving it cancels and awaits them all, then restores under the act lock through the power
  actuator, so nothing can write after or during the restore.
- The tick never awaits a server: scrapers and batch actuators are tasks of their own and the
  tick reads what they hold. The GPU read has a deadline. Only a completed tick feeds the
  systemd watchdog.
- Every power-limit write happens under the act lock, fitted to the budget in force at that
  moment. A lower budget is enforced at once by the budget task (coalesced: at most one
  enforcement pending, always for the newest budget); a raise is written only by a tick that
  started after the newest budget arrived, and only while no budget has expired into a lower
  one since the writes were fitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from palsd.act.batch_actuator import BatchActuator
from palsd.act.power import PowerActuator
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.safety import fit_to_budget, order_writes
from palsd.core.types import (
    BudgetInForce,
    Controller,
    Decision,
    GpuObservation,
    Observation,
    ServerObservation,
    Slo,
)
from palsd.errors import GpuError
from palsd.report.metrics import Metrics
from palsd.report.status import build_status, health_model
from palsd.runtime.budgets import BudgetDesk
from palsd.runtime.notify import Notifier
from palsd.sense.gpu import GpuBackend
from palsd.sense.scraper import GpuReader, ServerScraper

# How often a server's batch limit is read while all is well. A restart is caught sooner, from
# the scraped page; this bounds how long a limit set by hand goes unnoticed.
BATCH_POLL_S = 3.0


@dataclass
class ServerLink:
    """One configured server: its scrape task (sense) and its batch-limit task (act)."""

    name: str
    url: str
    gpu_indices: tuple[int, ...]
    slo: Slo
    scraper: ServerScraper
    batch: BatchActuator


class Daemon:
    def __init__(
        self,
        *,
        backend: GpuBackend,
        actuator: PowerActuator,
        controller: Controller,
        servers: Sequence[ServerLink],
        book: BudgetBook,
        metrics: Metrics,
        log: Any,
        period_s: float,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        restore: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.actuator, self.controller, self.servers = actuator, controller, list(servers)
        self.metrics, self.log, self.clock = metrics, log, clock
        self.notifier = notifier or Notifier("")
        self._restore = restore
        self._reader = GpuReader(backend)
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._act_lock = asyncio.Lock()
        self._written_at = float("-inf")  # time.monotonic() when the last write returned
        # The worker thread of the write in progress: cancelling its caller does not stop it.
        self._writing: asyncio.Future[Any] | None = None
        self.budgets = BudgetDesk(
            book, metrics, clock, lambda: sum(self._limits_w().values()) if self.gpus else None
        )
        self.gpus: tuple[GpuObservation, ...] = ()
        self.gpu_stale_reason: str | None = "not read yet"
        self.server_obs: tuple[ServerObservation, ...] = ()
        self.decision: Decision | None = None
        self.decided_at: float | None = None
        self.last_tick_at: float | None = None
        self.status_extra: dict[str, Callable[[], Any]] = {}
        self._restarts: dict[str, int] = {}  # each server's restarts as the last tick saw them
        self.set_period(period_s)

    # ---- lifetime: one TaskGroup ----

    async def __aenter__(self) -> Daemon:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        for link in self.servers:
            self.spawn(f"scrape:{link.name}", link.scraper.run())
            self.spawn(f"batch:{link.name}", link.batch.run())
        self.spawn("budget", self._enforce_cuts())
        self.spawn("tick", self._tick_loop())
        return self

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        assert self._tg is not None, "spawn inside `async with daemon`"
        self._tasks[name] = task = self._tg.create_task(coro, name=name)
        return task

    async def __aexit__(self, *exc: Any) -> None:
        self.budgets.closing = True  # a budget arriving from here on is recorded, never enforced
        self.notifier.stopping()
        for task in self._tasks.values():
            task.cancel()
        try:
            assert self._tg is not None
            await self._tg.__aexit__(*exc)
        finally:
            self._reader.cancel()
            async with self._act_lock:
                if self._writing is not None:
                    # A write the stop cancelled is still running in its thread: restore
                    # only once it has landed, or it would land over the restored limit.
                    with contextlib.suppress(Exception):
                        await self._writing
                if self._restore is not None:
                    await self._restore()

    def set_period(self, period_s: float) -> None:
        self.period_s = period_s
        self.gpu_deadline_s = 0.6 * period_s  # leaves the rest of the period to decide and act
        for link in self.servers:
            link.scraper.period_s = period_s
            # A limit changes rarely: read on a slow poll, and at once when the server's page
            # shows a restart or comes back after failing (see _sense_server).
            link.batch.poll_s = max(period_s, BATCH_POLL_S)

    # ---- budgets: arrive at self.budgets (feed, API, reload); cuts are enforced here ----

    def budget(self) -> BudgetInForce:
        return self.budgets.in_force()

    def set_override(self, entry: BudgetEntry | None) -> BudgetInForce:
        return self.budgets.set_override(entry)

    async def _enforce_cuts(self) -> None:
        while True:
            await self.budgets.wait_cut()  # an arrival, or an expiry, that leaves limits over
            await self.enforce_cut()

    async def enforce_cut(self) -> None:
        """Fit the limits in force to the newest budget (at most one enforcement pending)."""
        arrived = self.budgets.take_cut()
        async with self._act_lock:
            await self._write(self._limits_w(), "budget", self.budgets.seq, arrived)
        if arrived is not None:
            self.metrics.enforce_s.observe(time.perf_counter() - arrived)

    # ---- the tick ----

    async def _tick_loop(self) -> None:
        while True:
            started = time.monotonic()
            self.budgets.more_room.clear()
            try:
                await self.tick()
            except Exception as err:  # a tick must never take the daemon down
                self.log.exception("tick_failed", error=str(err))
            self.metrics.report_tick_time(time.monotonic() - started, self.period_s)
            await self._until_next_tick(started)

    async def _until_next_tick(self, started: float) -> None:
        timeout = self.period_s - (time.monotonic() - started)
        expiry = self.budgets.next_expiry()
        if expiry is not None:  # may hand over to a lower budget: tick right then
            timeout = min(timeout, expiry - self.clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.budgets.more_room.wait(), max(0.0, timeout))
        # Woken early by more room: still at most four ticks a period, whatever arrives.
        await asyncio.sleep(max(0.0, started + self.period_s / 4 - time.monotonic()))

    async def tick(self) -> bool:
        """One pass; False when the GPUs could not be read (limits held, nothing decided)."""
        seq, now = self.budgets.seq, self.clock()
        gpus = await self._sense_gpus()  # the only await before acting, and it has a deadline
        if gpus is None:
            return False
        servers = tuple(self._sense_server(link, old) for link, old in self._pairs())
        budget = self.budget()
        decision = self._guard(
            self.controller.decide(
                Observation(now, gpus, servers, budget, self.budgets.price_per_mwh)
            ),
            gpus,
            budget,
        )
        async with self._act_lock:
            await self._write(decision.power_limits_w, "tick", seq)
        for link in self.servers:  # each server's task writes it, off the tick
            link.batch.want(decision.batch_limits.get(link.name))
        self.server_obs, self.decision, self.decided_at = servers, decision, now
        self._report(budget, decision)
        return True

    async def _sense_gpus(self) -> tuple[GpuObservation, ...] | None:
        try:
            gpus = await self._reader.read(self.gpu_deadline_s)
        except GpuError as err:
            self.gpu_stale_reason = str(err)
            self.metrics.sense_errors.labels("gpu").inc()
            self.log.error("gpu_read_failed", error=str(err), action="holding last limits")
            return None
        if self._reader.started_at < self._written_at:
            # A write returned after this read began: the limits palsd knows are newer.
            known = self._limits_w()
            gpus = tuple(
                replace(g, power_limit_w=known.get(g.index, g.power_limit_w)) for g in gpus
            )
        self.gpus, self.gpu_stale_reason = gpus, None
        return gpus

    def _pairs(self) -> list[tuple[ServerLink, ServerObservation | None]]:
        previous = {s.name: s for s in self.server_obs}
        return [(link, previous.get(link.name)) for link in self.servers]

    def _sense_server(
        self, link: ServerLink, previous: ServerObservation | None
    ) -> ServerObservation:
        reading, batch = link.scraper.latest(), link.batch.view()
        restarts = link.scraper.source.restarts
        came_back = (
            reading.signals is not None and previous is not None and previous.signals is None
        )
        if came_back or restarts != self._restarts.get(link.name, restarts):
            link.batch.retry_soon()  # answers again, or restarted: its limit may be its own
        self._restarts[link.name] = restarts
        return ServerObservation(
            name=link.name,
            url=link.url,
            gpu_indices=link.gpu_indices,
            slo=link.slo,
            signals=reading.signals,
            batch_limit=batch.limit,
            max_num_seqs=batch.max_num_seqs,
            batch_control=batch.control,
            batch_control_reason=batch.reason,
            stale_reason=reading.stale_reason,
        )

    @staticmethod
    def _guard(
        decision: Decision, gpus: Sequence[GpuObservation], budget: BudgetInForce
    ) -> Decision:
        """The last guard: whatever the controller says, the safety rules hold."""
        fitted = fit_to_budget(decision.power_limits_w, gpus, budget.effective_w)
        if fitted.limits_w == dict(decision.power_limits_w) and not fitted.infeasible:
            return decision
        mode = "infeasible" if fitted.infeasible else decision.mode
        return replace(
            decision, power_limits_w=fitted.limits_w, infeasible=fitted.infeasible, mode=mode
        )

    # ---- act: every power-limit write ----

    def _limits_w(self) -> dict[int, float]:
        return {g.index: g.power_limit_w for g in self.gpus}

    async def _write(
        self, targets_w: Mapping[int, float], trigger: str, seq: int, arrived: float | None = None
    ) -> None:
        """Under the act lock: fit `targets_w` to the budget in force now and write them; a
        raise only while no budget newer than `seq` has arrived and the budget in force is not
        lower than the one they were fitted to (both checked before each raise)."""
        budget = self.budget()
        current = self._limits_w()
        limits_w = fit_to_budget(targets_w, self.gpus, budget.effective_w).limits_w
        if seq != self.budgets.seq:
            limits_w = {i: min(w, current.get(i, w)) for i, w in limits_w.items()}
        writes = order_writes(current, limits_w, budget_w=budget.effective_w)
        if not writes:
            return
        # The actuator tells lowerings from raises by the limits it knows: give it palsd's
        # view now, under the lock. A read that returned while a write was in flight carries
        # the limits from before it, and a raise taken for a lowering goes out with them.
        self.actuator.know(self.gpus)
        self._writing = asyncio.ensure_future(
            asyncio.to_thread(
                self.actuator.apply,
                writes,
                lambda: self.budgets.may_raise(seq, budget.effective_w),
            )
        )
        result = await asyncio.shield(self._writing)
        self._written_at = time.monotonic()
        self.gpus = tuple(
            replace(g, power_limit_w=result.applied.get(g.index, g.power_limit_w))
            for g in self.gpus
        )
        self.budgets.recheck()
        self.log.info(
            # A distinct event in dry run, so nobody reads would-be limits as real writes.
            "power_limits_would_apply" if self.actuator.dry_run else "power_limits_applied",
            trigger=trigger,
            budget_w=budget.effective_w,
            budget_source=budget.source.value,
            budget_seq=budget.seq,
            budget_origin=budget.origin,
            writes={str(i): w for i, w in result.applied.items()},
            failed={str(i): e for i, e in result.failed.items()},
            held={str(i): w for i, w in result.held.items()},
            sum_limit_w=round(sum(self._limits_w().values()), 3),
            t_wall=time.time(),
            since_arrival_ms=None
            if arrived is None
            else round((time.perf_counter() - arrived) * 1000, 3),
        )

    # ---- report ----

    def _report(self, budget: BudgetInForce, decision: Decision) -> None:
        self.last_tick_at = self.clock()
        power_w = self.metrics.report_tick(
            budget, decision, self.gpus, self.server_obs, self.last_tick_at
        )
        self.log.info(
            "decision",
            mode=decision.mode,
            reasons=list(decision.reasons),
            budget_w=budget.effective_w,
            budget_source=budget.source.value,
            power_limits_w={str(k): v for k, v in sorted(decision.power_limits_w.items())},
            batch_limits=dict(decision.batch_limits),
            sum_power_w=round(power_w, 1),
        )
        summary = f"budget {budget.effective_w} W ({budget.source.value}), mode {decision.mode}"
        self.notifier.tick_completed(summary)

    # ---- DaemonControl (palsd/runtime/control.py): what the local API may ask ----

    def now(self) -> float:
        return self.clock()

    def health(self) -> dict[str, Any]:
        return health_model(
            self.last_tick_at, self.clock(), self.period_s, self.actuator.record_problem
        )

    def status(self) -> dict[str, Any]:
        extra = {name: provider() for name, provider in self.status_extra.items()}
        extra["last_tick_at"] = self.last_tick_at
        extra["state_record_problem"] = self.actuator.record_problem
        return build_status(
            gpus=self.gpus,
            gpu_stale_reason=self.gpu_stale_reason,
            servers=self.server_obs,
            batch_limits_wanted={link.name: link.batch.wanted for link in self.servers},
            budget=self.budget(),
            decision=self.decision,
            decided_at=self.decided_at,
            controller=self.controller.name,
            dry_run=self.actuator.dry_run,
            period_s=self.period_s,
            extra=extra,
        )
