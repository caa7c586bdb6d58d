"""The daemon's tick and budget entry points over an in-memory GPU host (no mocks: a small
real implementation of the GpuBackend port) and in-memory server ports."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import structlog

from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.demand_split import DemandSplitController
from palsd.core.types import GpuObservation, ServerSignals, Slo
from palsd.errors import GpuUnavailable
from palsd.report.metrics import Metrics
from palsd.runtime.daemon import Daemon, ServerLink
from tests.unit.gpus import h100


class MemoryHost:
    name = "memory"

    def __init__(self, n: int, power_w: float = 400.0) -> None:
        self.gpus = {i: h100(i, power_w=power_w) for i in range(n)}
        self.writes: list[tuple[int, float]] = []
        self.fail_reads = False

    def read_all(self) -> list[GpuObservation]:
        if self.fail_reads:
            raise GpuUnavailable("host gone")
        return list(self.gpus.values())

    def set_power_limit_w(self, index: int, watts: float) -> None:
        self.writes.append((index, watts))
        self.gpus[index] = replace(self.gpus[index], power_limit_w=watts)

    def close(self) -> None:
        pass


class StaleSignals:
    stale_reason = "not reachable"

    async def poll(self, now_s: float) -> ServerSignals | None:
        return None


class MemoryBatch:
    def __init__(self) -> None:
        self.limit = 256
        self.sets: list[int] = []

    async def get(self):
        return type("S", (), {"limit": self.limit, "max_num_seqs": 256})()

    async def set(self, limit: int):
        self.sets.append(limit)
        self.limit = limit
        return await self.get()


def make_daemon(tmp_path, host: MemoryHost, dry_run: bool = False, book=None) -> Daemon:
    metrics = Metrics()
    log = structlog.get_logger("test")
    actuator = PowerActuator(host, OriginalsStore(tmp_path), metrics, log, dry_run)
    link = ServerLink("s0", "http://x", (0, 1), Slo(), StaleSignals(), MemoryBatch())
    return Daemon(
        backend=host,
        actuator=actuator,
        controller=DemandSplitController(),
        servers=[link],
        book=book or BudgetBook(),
        metrics=metrics,
        log=log,
        period_s=0.5,
        clock=lambda: 1000.0,
    )


async def test_lower_override_is_enforced_before_the_next_tick(tmp_path):
    host = MemoryHost(4)
    daemon = make_daemon(tmp_path, host)
    await daemon.tick()
    assert sum(g.power_limit_w for g in host.gpus.values()) == 2800
    daemon.set_override(BudgetEntry(1600.0))
    for _ in range(50):  # the enforcement task runs on the loop; no tick is called here
        await asyncio.sleep(0.01)
        if sum(g.power_limit_w for g in host.gpus.values()) <= 1600:
            break
    assert sum(g.power_limit_w for g in host.gpus.values()) <= 1600
    assert daemon.metrics.enforce_s._sum.get() > 0  # the enforcement was timed


async def test_dry_run_never_writes_but_reports_would_be_limits(tmp_path):
    host = MemoryHost(4)
    daemon = make_daemon(tmp_path, host, dry_run=True, book=BudgetBook(default_w=1000))
    for _ in range(3):
        await daemon.tick()
    assert host.writes == []
    assert sum(daemon.decision.power_limits_w.values()) <= 1000
    assert not (tmp_path / "originals.json").exists()


async def test_originals_recorded_before_first_write(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host, book=BudgetBook(default_w=800))
    await daemon.tick()
    record = OriginalsStore(tmp_path).load()
    assert record is not None
    assert {i: e["limit_w"] for i, e in record.gpus.items()} == {0: 700.0, 1: 700.0}
    store = OriginalsStore(tmp_path)
    result = await put_back(daemon.actuator.originals, store, host, {}, daemon.log)
    assert result.applied == {0: 700.0, 1: 700.0}
    assert all(g.power_limit_w == 700.0 for g in host.gpus.values())
    assert OriginalsStore(tmp_path).load() is None


async def test_gpu_read_failure_holds_limits_and_counts(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host, book=BudgetBook(default_w=800))
    await daemon.tick()
    writes = list(host.writes)
    host.fail_reads = True
    await daemon.tick()
    assert host.writes == writes
    assert daemon.metrics.sense_errors.labels("gpu")._value.get() == 1


async def test_stale_server_is_reported_not_fatal(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host)
    await daemon.tick()
    await asyncio.sleep(0.01)  # the batch-limit read runs beside the tick
    await daemon.tick()
    server = daemon.status()["servers"][0]
    assert server["up"] is False and server["stale_reason"] == "not reachable"
    assert server["batch_limit"] == 256


async def test_batch_limit_not_changed_before_its_original_is_known(tmp_path):
    host = MemoryHost(2)
    daemon = make_daemon(tmp_path, host)
    link = daemon.servers[0]
    daemon._act_batch({"s0": 8})  # the first tick's decision, before the read came back
    assert link.batch_task is None and link.batch.sets == []
    link.batch_limit, link.max_num_seqs = 256, 256
    recorded: list[tuple[str, int]] = []
    daemon._on_batch_original = lambda name, url, limit: recorded.append((name, limit))
    daemon._act_batch({"s0": 8})
    await link.batch_task
    assert link.batch.sets == [8] and recorded == [("s0", 256)]
