"""SIGTERM while a tick's power-limit writes are in flight: a worker thread cannot be cancelled,
so the restore must wait for it; otherwise its write lands after the restore and the GPU stays
at a limit palsd set, with the record already deleted."""

from __future__ import annotations

import asyncio
import threading

from palsd.act.originals import OriginalsStore
from palsd.act.restore import put_back
from palsd.core.budget import BudgetBook
from tests.unit.test_daemon import MemoryHost, make_daemon, until


class SlowSetter(MemoryHost):
    """GPU 0's set call blocks until `release` is set (a slow NVML call mid-tick)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.entered = threading.Event()
        self.release = threading.Event()

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if index == 0 and not self.release.is_set():
            self.entered.set()
            self.release.wait(5.0)
        super().set_power_limit_w(index, watts)


async def test_daemon_stop_during_a_write_restores_after_the_write_returned(tmp_path):
    host = SlowSetter(2)
    store = OriginalsStore(tmp_path)

    async def restore() -> None:
        await put_back(daemon.actuator.originals, store, daemon.actuator, {}, daemon.log)

    daemon = make_daemon(
        tmp_path, host, book=BudgetBook(default_w=1000), period_s=0.05, restore=restore
    )
    # The set call returns a while after the stop began.
    threading.Timer(0.3, host.release.set).start()
    async with daemon:
        await until(lambda: host.entered.is_set())  # the tick is inside GPU 0's set call
    await asyncio.sleep(0.5)  # the blocked write has certainly landed by now
    assert {i: g.power_limit_w for i, g in host.gpus.items()} == {0: 700.0, 1: 700.0}
    assert host.writes[-1][1] == 700.0
    assert store.load() is None
