"""In-memory stand-ins for the sense ports, shared by tests and benchmarks: a GPU host and a
server's signals. Small real implementations of the ports, not mocks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import replace

from palsd.core.types import GpuObservation, ServerSignals
from palsd.errors import GpuUnavailable


def h100(index: int, power_w: float | None = 300.0, limit_w: float = 700.0) -> GpuObservation:
    """An H100 as NVML shows it: limits settable in [200, 700] W."""
    return GpuObservation(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index:04d}",
        power_w=power_w,
        power_instant_w=power_w,
        energy_j=1000.0,
        power_limit_w=limit_w,
        enforced_limit_w=limit_w,
        min_limit_w=200.0,
        max_limit_w=700.0,
        default_limit_w=700.0,
    )


class MemoryHost:
    """A GpuBackend over a dict of GPUs. `writes` lists every set call; `fail_reads` makes reads
    fail; `hold_reads` (cleared) makes them hang until it is set; `on_set` runs inside each
    set call, after the limit changed (a test's hook for "something arrived meanwhile")."""

    name = "memory"

    def __init__(self, n: int, power_w: float = 400.0) -> None:
        self.gpus = {i: h100(i, power_w=power_w) for i in range(n)}
        self.writes: list[tuple[int, float]] = []
        self.fail_reads = False
        self.hold_reads = threading.Event()
        self.hold_reads.set()
        self.reads = 0
        self.on_set: Callable[[int, float], None] | None = None
        self._lock = threading.Lock()

    def read_all(self) -> list[GpuObservation]:
        self.reads += 1
        self.hold_reads.wait()
        if self.fail_reads:
            raise GpuUnavailable("host gone")
        with self._lock:
            return list(self.gpus.values())

    def set_power_limit_w(self, index: int, watts: float) -> None:
        with self._lock:
            self.writes.append((index, watts))
            self.gpus[index] = replace(self.gpus[index], power_limit_w=watts)
        if self.on_set is not None:
            self.on_set(index, watts)

    def limit_sum_w(self) -> float:
        with self._lock:
            return sum(g.power_limit_w for g in self.gpus.values())

    def close(self) -> None:
        pass


class FixedSignals:
    """A SignalSource that answers `signals` (None: stale, with `reason`) after `delay_s`."""

    def __init__(
        self,
        signals: ServerSignals | None = None,
        reason: str = "not reachable",
        delay_s: float = 0.0,
        url: str = "http://memory/metrics",
    ) -> None:
        self.url = url
        self.signals = signals
        self.reason = reason
        self.delay_s = delay_s
        self.stale_reason: str | None = "not scraped yet"
        self.restarts = 0  # a test sets it to play a restarted server
        self.polls = 0

    async def poll(self, now_s: float) -> ServerSignals | None:
        self.polls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.stale_reason = None if self.signals is not None else self.reason
        return self.signals
