"""The daemon's tick, its budget entry points and its lifetime, over in-memory ports (small real
implementations of the GPU, signal and batch ports; no mocks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from palsd.act.batch_actuator import BatchActuator
from palsd.act.memory import MemoryBatchPort
from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.demand_split import DemandSplitController
from palsd.core.types import Controller, Decision, Observation, Slo
from palsd.report.metrics import Metrics
from palsd.runtime.daemon import Daemon, ServerLink
from palsd.runtime.notify import Notifier
from palsd.sense.memory import FixedSignals, MemoryHost
from palsd.sense.scraper import ServerScraper

__all__ = ["MemoryHost", "make_daemon", "until"]  # MemoryHost: other tests import it from here


class SentNotifier(Notifier):
    """Records what would go to systemd."""

    def __init__(self) -> None:
        super().__init__("")
        self.sent: list[tuple[str, ...]] = []

    def send(self, *states: str) -> None:
        self.sent.append(states)


def make_daemon(
    tmp_path: Path,
    host: MemoryHost,
    *,
    dry_run: bool = False,
    book: BudgetBook | None = None,
    period_s: float = 0.5,
    controller: Controller | None = None,
    signals: FixedSignals | None = None,
    port: MemoryBatchPort | None = None,
    notifier: Notifier | None = None,
    restore: Callable[[], Awaitable[object]] | None = None,
    clock: Callable[[], float] = lambda: 1000.0,
) -> Daemon:
    metrics = Metrics()
    log = structlog.get_logger("test")
    actuator = PowerActuator(host, OriginalsStore(tmp_path), metrics, log, dry_run)
    batch = BatchActuator(
        "s0",
        "http://x",
        port or MemoryBatchPort(),
        log=log,
        metrics=metrics,
        record_original=actuator.record_server,
        dry_run=dry_run,
        poll_s=period_s,
    )
    scraper = ServerScraper(signals or FixedSignals(), period_s)
    return Daemon(
        backend=host,
        actuator=actuator,
        controller=controller or DemandSplitController(),
        servers=[ServerLink("s0", "http://x", (0, 1), Slo(), scraper, batch)],
        book=book or BudgetBook(),
        metrics=metrics,
        log=log,
        period_s=period_s,
        notifier=notifier,
        clock=clock,
        restore=restore,
    )


async def until(predicate: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Await a condition the daemon's tasks bring about (bounded; fails loudly)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
    return value


def decisions(daemon: Daemon) -> float:
    """Completed ticks: each one counts its decision."""
    return sum(
        sample.value
        for family in daemon.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "palsd_decisions_total"
    )


async def test_lower_override_is_enforced_at_once_by_the_budget_task(tmp_path):
    host = MemoryHost(4)
    # A long period: no tick comes between the override and its enforcement.
    daemon = make_daemon(tmp_path, host, period_s=30.0)
    async with daemon:
        await until(lambda: daemon.last_tick_at is not None)
        assert host.limit_sum_w() == 2800
        ticks = decisions(daemon)
        assert ticks >= 1
        daemon.set_override(BudgetEntry(1600.0))
        await until(lambda: host.limit_sum_w() <= 1600, timeout_s=5.0)
        # No tick came in between: the budget task enforced it.
        assert decisions(daemon) == ticks
        # The enforcement was timed (observed once its writes returned, just after the limits
        # changed on the host: wait for it rather than race it).
        await until(lambda: daemon.metrics.enforce_s._sum.get() > 0, timeout_s=5.0)


async def test_dry_run_never_writes_but_reports_would_be_limits(tmp_path):
    host = MemoryHost(4)
    daemon = make_daemon(tmp_path, host, dry_run=True, book=BudgetBook(default_w=1000))
    for _ in range(3):
        assert await daemon.tick()
    assert host.writes == []
    assert daemon.decision is not None and sum(daemon.decision.power_limits_w.values()) <= 1000
    assert not (tmp_path / "originals.json").exists()


async def test_originals_recorded_before_first_write_and_restored_through_the_actuator(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host, book=BudgetBook(default_w=800))
    await daemon.tick()
    record = OriginalsStore(tmp_path).load()
    assert record is not None
    assert {i: e["limit_w"] for i, e in record.gpus.items()} == {0: 700.0, 1: 700.0}
    writes_before = daemon.metrics.limit_writes._value.get()
    store = OriginalsStore(tmp_path)
    result = await put_back(daemon.actuator.originals, store, daemon.actuator, {}, daemon.log)
    assert result.applied == {0: 700.0, 1: 700.0}
    assert all(g.power_limit_w == 700.0 for g in host.gpus.values())
    assert OriginalsStore(tmp_path).load() is None
    # The restore went through the one choke point: its writes are counted like any other.
    assert daemon.metrics.limit_writes._value.get() == writes_before + 2


async def test_gpu_read_failure_holds_limits_counts_and_says_why(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host, book=BudgetBook(default_w=800))
    assert await daemon.tick()
    writes = list(host.writes)
    host.fail_reads = True
    assert not await daemon.tick()
    assert host.writes == writes
    assert daemon.metrics.sense_errors.labels("gpu")._value.get() == 1
    assert "host gone" in daemon.status()["gpu_stale_reason"]


async def test_a_hung_gpu_read_misses_its_deadline_and_is_never_doubled(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host, period_s=0.2)
    host.hold_reads.clear()
    try:
        for _ in range(3):
            started = time.monotonic()
            assert not await daemon.tick()
            assert time.monotonic() - started < daemon.gpu_deadline_s + 0.5  # not the read
        assert host.reads == 1  # the later ticks waited for the same read
        assert "has not answered" in daemon.status()["gpu_stale_reason"]
    finally:
        host.hold_reads.set()
    assert await daemon.tick()
    assert daemon.status()["gpu_stale_reason"] is None


async def test_stale_server_is_reported_with_its_reason_not_fatal(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host, period_s=0.05)
    async with daemon:
        server = await until(lambda: (daemon.status()["servers"] or [None])[0])
        await until(lambda: daemon.status()["servers"][0]["batch_limit"] == 256)
        server = daemon.status()["servers"][0]
    assert server["up"] is False and server["stale_reason"] == "not reachable"
    assert server["batch_control"] == "ok"


async def test_only_completed_ticks_say_ready_and_feed_the_watchdog(tmp_path):
    host = MemoryHost(2)
    notifier = SentNotifier()
    daemon = make_daemon(tmp_path, host, notifier=notifier)
    host.fail_reads = True
    await daemon.tick()
    await daemon.tick()
    assert notifier.sent == []
    host.fail_reads = False
    await daemon.tick()
    await daemon.tick()
    assert [states[0] for states in notifier.sent] == ["READY=1", "WATCHDOG=1"]


async def test_exit_stops_every_task_then_restores_under_the_act_lock(tmp_path):
    host = MemoryHost(4)
    store = OriginalsStore(tmp_path)
    seen: dict[str, Any] = {}

    async def restore() -> None:
        seen["tasks_done"] = all(t.done() for t in daemon._tasks.values())
        seen["act_lock_held"] = daemon._act_lock.locked()
        daemon.set_override(BudgetEntry(900.0))  # a cut arriving during shutdown
        await put_back(daemon.actuator.originals, store, daemon.actuator, {}, daemon.log)
        seen["writes"] = len(host.writes)

    daemon = make_daemon(
        tmp_path, host, book=BudgetBook(default_w=2000), period_s=0.05, restore=restore
    )
    async with daemon:
        await until(lambda: host.limit_sum_w() <= 2000)
        daemon.set_override(BudgetEntry(1500.0))  # and one just before it
    assert seen == {"tasks_done": True, "act_lock_held": True, "writes": len(host.writes)}
    await asyncio.sleep(0.1)
    assert len(host.writes) == seen["writes"]  # nothing was written after the restore
    assert all(g.power_limit_w == 700.0 for g in host.gpus.values())
    assert store.load() is None


async def test_a_failing_task_stops_the_daemon_and_still_restores(tmp_path):
    host = MemoryHost(2)
    restored: list[bool] = []

    async def restore() -> None:
        restored.append(True)

    async def broken() -> None:
        raise RuntimeError("the API server died")

    daemon = make_daemon(tmp_path, host, restore=restore)
    try:
        async with daemon:
            daemon.spawn("api", broken())
            await asyncio.sleep(5)  # cancelled by the failure
    except* RuntimeError as group:
        assert "the API server died" in str(group.exceptions[0])
    else:
        raise AssertionError("the failure must surface")
    assert restored == [True]


async def test_an_expired_price_is_absent_from_the_controllers_observation(tmp_path):
    """A price is observed until its expiry, then it is None: a stale price is no price."""

    class Recording(DemandSplitController):
        def __init__(self) -> None:
            super().__init__()
            self.prices: list[float | None] = []

        def decide(self, obs: Observation) -> Decision:
            self.prices.append(obs.price_per_mwh)
            return super().decide(obs)

    now = [1000.0]
    controller = Recording()
    daemon = make_daemon(tmp_path, MemoryHost(2), controller=controller, clock=lambda: now[0])
    daemon.budgets.price(87.5, expires_at=1010.0)
    assert await daemon.tick()
    now[0] = 1010.0
    assert await daemon.tick()
    daemon.budgets.price(-3.0, expires_at=None)  # a price without expiry holds until replaced
    assert await daemon.tick()
    assert controller.prices == [87.5, None, -3.0]
