"""The daemon's tick: sense -> decide -> act -> report, every control period.

Also the budget entry points (local override, facility feed): a budget that lowers what is
allowed is enforced on arrival from the last known limits, without waiting for the next tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from palsd.act.power import PowerActuator
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.safety import fit_to_budget, order_writes
from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    Controller,
    Decision,
    GpuObservation,
    Observation,
    ServerObservation,
    ServerSignals,
    Slo,
)
from palsd.errors import GpuError, PalsdError
from palsd.report.metrics import Metrics
from palsd.report.status import build_status, slo_met
from palsd.runtime.notify import Notifier
from palsd.sense.gpu import GpuBackend


class SignalSource(Protocol):
    stale_reason: str | None

    async def poll(self, now_s: float) -> ServerSignals | None: ...


class BatchPort(Protocol):
    async def get(self) -> Any: ...  # BatchLimitState | None

    async def set(self, limit: int) -> Any: ...


@dataclass
class ServerLink:
    """Everything the daemon holds for one configured server."""

    name: str
    url: str
    gpu_indices: tuple[int, ...]
    slo: Slo
    signals: SignalSource
    batch: BatchPort
    min_batch_limit: int = 1
    max_batch_limit: int | None = None
    batch_limit: int | None = None
    max_num_seqs: int | None = None
    batch_task: asyncio.Task[None] | None = None


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
        on_batch_original: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.backend = backend
        self.actuator = actuator
        self.controller = controller
        self.servers = list(servers)
        self.book = book
        self.metrics = metrics
        self.log = log
        self.period_s = period_s
        self.notifier = notifier or Notifier("")
        self.clock = clock
        self._on_batch_original = on_batch_original
        self._wake = asyncio.Event()
        self._act_lock = asyncio.Lock()
        self.gpus: tuple[GpuObservation, ...] = ()
        self.server_obs: tuple[ServerObservation, ...] = ()
        self.decision: Decision | None = None
        self.decided_at: float | None = None
        self.last_tick_at: float | None = None
        self.price_per_mwh: float | None = None
        self.status_extra: dict[str, Callable[[], Any]] = {}
        self._ready = False

    # ---- budget entry points (called on the event loop) ----

    def budget(self) -> BudgetInForce:
        return self.book.in_force(self.clock())

    def set_override(self, entry: BudgetEntry | None) -> BudgetInForce:
        self._change_budget(self.book.with_override(entry))
        return self.budget()

    def facility_budget(self, origin: str, entry: BudgetEntry | None) -> None:
        self._change_budget(self.book.with_facility(origin, entry))

    def price(self, price_per_mwh: float, expires_at: float | None) -> None:
        self.price_per_mwh = price_per_mwh

    def replace_book_config(self, default_w: float | None, fallback_w: float | None) -> None:
        self._change_budget(replace(self.book, default_w=default_w, fallback_w=fallback_w))

    def _change_budget(self, book: BudgetBook) -> None:
        arrived = time.perf_counter()
        self.book = book
        budget = self.budget()
        self._report_budget(budget)
        current = sum(g.power_limit_w for g in self.gpus)
        if budget.effective_w is not None and self.gpus and current > budget.effective_w:
            task = asyncio.get_running_loop().create_task(self._enforce_now(budget, arrived))
            task.add_done_callback(_log_task_failure(self.log))
        else:
            # More room (or none needed): let the controller use it at once. A cut is
            # enforced above; an extra tick now would only compete with it for the CPU.
            self._wake.set()

    async def _enforce_now(self, budget: BudgetInForce, arrived: float) -> None:
        async with self._act_lock:
            fitted = fit_to_budget(
                {g.index: g.power_limit_w for g in self.gpus}, self.gpus, budget.effective_w
            )
            writes = order_writes({g.index: g.power_limit_w for g in self.gpus}, fitted.limits_w)
            await self._write(writes, "budget", budget, arrived)
        self.metrics.enforce_s.observe(time.perf_counter() - arrived)

    # ---- the tick ----

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await self.tick()
            except Exception as err:  # a tick must never take the daemon down
                self.log.exception("tick_failed", error=str(err))
            elapsed = time.perf_counter() - started
            self.metrics.tick_s.observe(elapsed)
            if elapsed > self.period_s:
                self.metrics.tick_overruns.inc()
            self._wake.clear()
            timeout = max(0.0, self.period_s - elapsed)
            now = self.clock()
            expiry = self.book.next_expiry(now)
            if expiry is not None:
                # A budget that expires may hand over to a lower one (facility -> fallback):
                # tick right then rather than up to a period later.
                timeout = min(timeout, max(0.0, expiry - now))
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            _, pending = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for p in pending:
                p.cancel()

    async def tick(self) -> None:
        now = self.clock()
        gpus_task = asyncio.create_task(asyncio.to_thread(self.backend.read_all))
        servers = await asyncio.gather(*(self._sense_server(s, now) for s in self.servers))
        try:
            gpus = tuple(await gpus_task)
        except GpuError as err:
            self.metrics.sense_errors.labels("gpu").inc()
            self.log.error("gpu_read_failed", error=str(err), action="holding last limits")
            return
        self.gpus = gpus
        self.actuator.know(gpus)
        self.server_obs = tuple(servers)
        budget = self.budget()
        obs = Observation(now, gpus, self.server_obs, budget, self.price_per_mwh)
        decision = self.controller.decide(obs)
        # The last guard: whatever the controller says, the safety rules hold.
        fitted = fit_to_budget(decision.power_limits_w, gpus, budget.effective_w)
        if fitted.limits_w != dict(decision.power_limits_w) or fitted.infeasible:
            decision = replace(
                decision,
                power_limits_w=fitted.limits_w,
                infeasible=fitted.infeasible,
                mode="infeasible" if fitted.infeasible else decision.mode,
            )
        self.decision, self.decided_at = decision, now
        self.metrics.decisions.labels(decision.mode).inc()
        async with self._act_lock:
            current = {g.index: g.power_limit_w for g in self.gpus}
            await self._write(order_writes(current, decision.power_limits_w), "tick", budget)
        self._act_batch(decision.batch_limits)
        self._report(budget, decision)
        self.last_tick_at = self.clock()
        self.metrics.last_tick_ts.set(self.last_tick_at)
        summary = f"budget {budget.effective_w} W ({budget.source.value}), mode {decision.mode}"
        if not self._ready:
            self._ready = True
            self.notifier.ready(summary)
        else:
            self.notifier.watchdog(summary)

    async def _write(
        self,
        writes: list[tuple[int, float]],
        trigger: str,
        budget: BudgetInForce,
        arrived: float | None = None,
    ) -> None:
        if not writes:
            return
        result = await asyncio.to_thread(self.actuator.apply, writes)
        if result.applied:
            # Track what is now in force so the next enforcement starts from the truth.
            self.gpus = tuple(
                replace(g, power_limit_w=result.applied.get(g.index, g.power_limit_w))
                for g in self.gpus
            )
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
            sum_limit_w=round(sum(g.power_limit_w for g in self.gpus), 3),
            t_wall=time.time(),
            since_arrival_ms=None
            if arrived is None
            else round((time.perf_counter() - arrived) * 1000, 3),
        )

    async def _sense_server(self, link: ServerLink, now: float) -> ServerObservation:
        signals = await link.signals.poll(now)
        if signals is None:
            self.metrics.sense_errors.labels(f"server:{link.name}").inc()
        if (link.batch_limit is None or link.max_num_seqs is None) and (
            link.batch_task is None or link.batch_task.done()
        ):
            # In the background: a hung endpoint must not stretch the tick.
            link.batch_task = asyncio.create_task(self._refresh_batch(link))
        return ServerObservation(
            name=link.name,
            url=link.url,
            gpu_indices=link.gpu_indices,
            slo=link.slo,
            signals=signals,
            batch_limit=link.batch_limit,
            max_num_seqs=link.max_num_seqs,
        )

    async def _refresh_batch(self, link: ServerLink) -> None:
        try:
            state = await link.batch.get()
        except PalsdError as err:
            self.log.warning("batch_limit_read_failed", server=link.name, error=str(err))
            return
        if state is not None:
            link.batch_limit, link.max_num_seqs = state.limit, state.max_num_seqs

    def _act_batch(self, limits: Mapping[str, int]) -> None:
        for link in self.servers:
            want = limits.get(link.name)
            if want is None or want == link.batch_limit:
                continue
            if link.batch_limit is None or link.max_num_seqs is None:
                continue  # not read yet: without the original there is nothing to restore to
            if link.batch_task is not None and not link.batch_task.done():
                continue  # one write in flight per server; the next tick tries again
            top = min(link.max_num_seqs, link.max_batch_limit or link.max_num_seqs)
            want = max(link.min_batch_limit, min(want, top))
            link.batch_task = asyncio.create_task(self._set_batch(link, want))

    async def _set_batch(self, link: ServerLink, limit: int) -> None:
        if self.actuator.dry_run:
            self.log.info("would_set_batch_limit", server=link.name, limit=limit, dry_run=True)
            return
        if link.batch_limit is not None and self._on_batch_original is not None:
            self._on_batch_original(link.name, link.url, link.batch_limit)
        try:
            state = await link.batch.set(limit)
        except PalsdError as err:
            self.metrics.actuation_errors.labels("batch", type(err).__name__).inc()
            self.log.error(
                "batch_limit_write_failed", server=link.name, limit=limit, error=str(err)
            )
            link.batch_limit = None  # re-read next tick
            return
        link.batch_limit = getattr(state, "limit", limit)
        self.log.info("batch_limit_applied", server=link.name, limit=link.batch_limit)

    # ---- report ----

    def _report_budget(self, budget: BudgetInForce) -> None:
        m = self.metrics
        m.budget_w.set(float("nan") if budget.effective_w is None else budget.effective_w)
        for source in BudgetSource:
            m.budget_source.labels(source.value).set(1 if source == budget.source else 0)
        m.fallback_active.set(1 if budget.source == BudgetSource.FALLBACK else 0)

    def _report(self, budget: BudgetInForce, decision: Decision) -> None:
        m = self.metrics
        self._report_budget(budget)
        m.budget_infeasible.set(1 if decision.infeasible else 0)
        for g in self.gpus:
            label = str(g.index)
            if g.power_w is not None:
                m.gpu_power_w.labels(label).set(g.power_w)
            if g.power_instant_w is not None:
                m.gpu_power_instant_w.labels(label).set(g.power_instant_w)
            if g.energy_j is not None:
                m.gpu_energy_j.labels(label).set(g.energy_j)
            m.gpu_limit_w.labels(label).set(g.power_limit_w)
            m.gpu_min_limit_w.labels(label).set(g.min_limit_w)
            m.gpu_max_limit_w.labels(label).set(g.max_limit_w)
        m.limit_sum_w.set(sum(g.power_limit_w for g in self.gpus))
        power_w = sum(g.power_w or 0.0 for g in self.gpus)
        m.power_sum_w.set(power_w)
        tokens_per_s = 0.0
        for s in self.server_obs:
            m.server_up.labels(s.name).set(0 if s.signals is None else 1)
            if s.batch_limit is not None:
                m.server_batch_limit.labels(s.name).set(s.batch_limit)
            if s.signals is not None:
                m.server_running.labels(s.name).set(s.signals.running)
                m.server_waiting.labels(s.name).set(s.signals.waiting)
                m.server_gen_tps.labels(s.name).set(s.signals.generation_tokens_per_s)
                tokens_per_s += s.signals.generation_tokens_per_s
            met = slo_met(s)
            if met is not None:
                m.server_slo_met.labels(s.name).set(1 if met else 0)
        if power_w > 0:
            m.tokens_per_joule.set(tokens_per_s / power_w)
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

    def now(self) -> float:
        return self.clock()

    def health(self) -> dict[str, Any]:
        last = self.last_tick_at
        age = None if last is None else max(0.0, self.clock() - last)
        problems = []
        if age is None or age >= max(5.0, 5 * self.period_s):
            problems.append("the control loop has not completed a tick recently")
        if self.actuator.record_problem is not None:
            problems.append(self.actuator.record_problem)
        return {"ok": not problems, "last_tick_age_s": age, "problems": problems}

    def status(self) -> dict[str, Any]:
        extra = {name: provider() for name, provider in self.status_extra.items()}
        extra["last_tick_at"] = self.last_tick_at
        return build_status(
            gpus=self.gpus,
            servers=self.server_obs,
            stale_reasons={s.name: s.signals.stale_reason for s in self.servers},
            budget=self.budget(),
            decision=self.decision,
            decided_at=self.decided_at,
            controller=self.controller.name,
            dry_run=self.actuator.dry_run,
            period_s=self.period_s,
            extra=extra,
        )

    async def close_batch_tasks(self) -> None:
        tasks = [s.batch_task for s in self.servers if s.batch_task and not s.batch_task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_task_failure(log: Any) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", error=repr(task.exception()))

    return done
