"""A GPU read that returns while a budget enforcement's writes are in flight carries the limits
from before those writes. The daemon corrects its own view when the writes return; the power
actuator must not be left with the old limits either: it tells lowerings from raises by them,
and a raise it takes for a lowering goes out at once, beside the real lowerings."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.types import GpuObservation
from palsd.sense.memory import MemoryHost
from tests.unit.test_budget_race import Audit, Scripted
from tests.unit.test_daemon import make_daemon


class Staged(MemoryHost):
    """Reads snapshot the limits, then wait for `release_read`; a GPU's set call waits for its
    event in `release_set` (cleared to hold it, set to let it go)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.release_read = threading.Event()
        self.release_read.set()
        self.reading = threading.Event()
        self.release_set = {i: threading.Event() for i in range(n)}
        for event in self.release_set.values():
            event.set()

    def read_all(self) -> list[GpuObservation]:
        with self._lock:
            snapshot = list(self.gpus.values())
        self.reading.set()
        self.release_read.wait(5)
        return snapshot

    def set_power_limit_w(self, index: int, watts: float) -> None:
        self.release_set[index].wait(5)
        super().set_power_limit_w(index, watts)


async def _wait(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 5)


async def _until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


def test_a_read_returning_mid_enforcement_does_not_turn_a_raise_into_a_lowering(tmp_path):
    host = Staged(2)
    controller = Scripted()
    daemon = make_daemon(tmp_path, host, controller=controller, book=BudgetBook(default_w=1400))
    audit = Audit(host, daemon)

    async def scenario() -> None:
        audit.loop = asyncio.get_running_loop()
        controller.targets = {0: 700.0, 1: 700.0}
        assert await daemon.tick()
        # A cut to 1000 W: its enforcement lowers both GPUs to 500 W; both set calls hang.
        for event in host.release_set.values():
            event.clear()
        daemon.set_override(BudgetEntry(1000.0))
        enforce = asyncio.create_task(daemon.enforce_cut())
        # A tick starts after the cut (it may raise): its read snapshots 700 + 700 W, held.
        host.release_read.clear()
        host.reading.clear()
        controller.targets = {0: 600.0, 1: 400.0}  # it moves 100 W from GPU 1 to GPU 0
        tick = asyncio.create_task(daemon.tick())
        await _wait(host.reading)
        host.release_set[0].set()  # GPU 0 lands at 500 W...
        await _until(lambda: host.gpus[0].power_limit_w == 500.0)
        host.release_read.set()  # ...then the read returns, saying 700 + 700 W
        await asyncio.sleep(0.1)  # the tick has taken the read and waits for the act lock
        host.release_set[1].set()
        await enforce
        # The tick's writes: GPU 1 down to 400 W must land before GPU 0 goes up to 600 W.
        host.release_set[1].clear()
        threading.Timer(0.2, host.release_set[1].set).start()
        assert await tick

    asyncio.run(scenario())
    assert {i: g.power_limit_w for i, g in host.gpus.items()} == {0: 600.0, 1: 400.0}
    assert audit.violations == []  # was: GPU 0's raise to 600 W went out beside GPU 1's
    # lowering, as if 600 W were below its 700 W, and landed first: 1100 W over 1000 W
