"""The one choke point for every power-limit write: clamp, record ownership, write, count, log.

Blocking (backends block); the daemon calls it from a worker thread. In dry run it logs the
limits it would set and calls no setter at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from palsd.act.originals import Originals, OriginalsStore
from palsd.core.safety import clamp_limit_w
from palsd.core.types import GpuObservation
from palsd.errors import GpuError
from palsd.report.metrics import Metrics
from palsd.sense.gpu import GpuBackend


@dataclass(frozen=True)
class WriteResult:
    applied: dict[int, float]
    failed: dict[int, str]


class PowerActuator:
    def __init__(
        self,
        backend: GpuBackend,
        store: OriginalsStore,
        metrics: Metrics,
        log: Any,
        dry_run: bool,
    ) -> None:
        self._backend = backend
        self._store = store
        self._metrics = metrics
        self._log = log
        self.dry_run = dry_run
        self.originals = Originals()
        self._gpus: dict[int, GpuObservation] = {}
        self._executor: ThreadPoolExecutor | None = None

    def adopt(self, originals: Originals) -> None:
        """Keep an existing record (e.g. servers' batch limits recorded by another path)."""
        self.originals = originals

    def know(self, gpus: Sequence[GpuObservation]) -> None:
        """Remember constraints (for clamping) and record originals of GPUs not yet recorded."""
        for g in gpus:
            self._gpus[g.index] = g

    def _record(self, indices: Sequence[int]) -> None:
        """Record the originals of GPUs not yet recorded, in one atomic save."""
        fresh = [i for i in indices if i not in self.originals.gpus]
        if not fresh:
            return
        for index in fresh:
            g = self._gpus[index]
            self.originals.gpus[index] = {"uuid": g.uuid, "limit_w": g.power_limit_w}
        self._store.save(self.originals)

    def _write_one(self, index: int, watts: float) -> str | None:
        try:
            self._backend.set_power_limit_w(index, watts)
        except GpuError as err:
            self._metrics.actuation_errors.labels("power", type(err).__name__).inc()
            self._log.error("power_limit_write_failed", gpu=index, limit_w=watts, error=str(err))
            return str(err)
        self._gpus[index] = replace(self._gpus[index], power_limit_w=watts)
        return None

    def apply(self, writes: Sequence[tuple[int, float]]) -> WriteResult:
        """Write every lowering at once, then every raise at once: the applied sum never
        passes through a state above both the old and the new one, and a budget cut costs one
        set-call latency rather than one per GPU. A failed write is counted and logged; the
        rest still go out, since each lowering keeps the host safe."""
        applied: dict[int, float] = {}
        failed: dict[int, str] = {}
        plan: list[tuple[int, float]] = []
        for index, target_w in writes:
            gpu = self._gpus.get(index)
            if gpu is None:
                failed[index] = "unknown GPU"
                continue
            plan.append((index, clamp_limit_w(target_w, gpu)))
        self._metrics.limit_writes.inc(len(plan))
        if self.dry_run:
            for index, watts in plan:
                self._log.info("would_set_power_limit", gpu=index, limit_w=watts, dry_run=True)
                applied[index] = watts
            return WriteResult(applied, failed)
        self._record([i for i, _ in plan])
        lowers = [(i, w) for i, w in plan if w < self._gpus[i].power_limit_w]
        raises = [(i, w) for i, w in plan if w >= self._gpus[i].power_limit_w]
        for phase in (lowers, raises):
            if len(phase) == 1:
                errors = [self._write_one(*phase[0])]
            else:
                errors = list(self._pool().map(lambda item: self._write_one(*item), phase))
            for (index, watts), error in zip(phase, errors, strict=True):
                if error is None:
                    applied[index] = watts
                else:
                    failed[index] = error
        return WriteResult(applied, failed)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="power-write")
        return self._executor
