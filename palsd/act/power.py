"""The one choke point for every power-limit write: clamp, record ownership, write, count, log.

Blocking (backends block); the daemon calls it from a worker thread. In dry run it logs the
limits it would set and calls no setter at all.

No write without a durable record: a GPU's limit is written only once the originals record
holding that GPU's original limit is on disk. When the record cannot be saved (disk full,
read-only state directory) the GPUs it would cover are not written at all, `record_problem` says
why (status and health show it), `palsd_state_write_failures_total` counts each failed save, and
the next apply (every tick) tries again. GPUs recorded earlier are still written: `palsd
restore` has what it needs for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
    # Raises not written: may_raise said no, or a failed lowering left no room for them.
    held: dict[int, float] = field(default_factory=dict)


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
        self.originals = Originals()  # only ever what is on disk (or nothing saved yet)
        self.record_problem: str | None = None  # why the record cannot be saved, None if fine
        self._gpus: dict[int, GpuObservation] = {}
        self._executor: ThreadPoolExecutor | None = None

    def adopt(self, originals: Originals) -> None:
        """Keep an existing record (e.g. servers' batch limits recorded by another path)."""
        self.originals = originals

    def know(self, gpus: Sequence[GpuObservation]) -> None:
        """Remember constraints (for clamping) and record originals of GPUs not yet recorded."""
        for g in gpus:
            self._gpus[g.index] = g

    def _record(self, indices: Sequence[int]) -> set[int]:
        """Record the originals of GPUs not yet recorded, in one durable save. Returns the
        indices whose original is on disk; memory changes only after the save succeeded."""
        fresh = [i for i in indices if i not in self.originals.gpus]
        if fresh:
            candidate = self.originals.copy()
            for index in fresh:
                g = self._gpus[index]
                candidate.gpus[index] = {"uuid": g.uuid, "limit_w": g.power_limit_w}
            if not self._save(candidate):
                return {i for i in indices if i in self.originals.gpus}
        return set(indices)

    def record_server(self, name: str, url: str, batch_limit: int) -> bool:
        """Record a server's original batch limit durably before it is first changed; False
        (nothing changed in memory) when the record cannot be saved: then do not write."""
        if name in self.originals.servers:
            return True
        candidate = self.originals.copy()
        candidate.servers[name] = {"url": url, "batch_limit": batch_limit}
        return self._save(candidate)

    def _save(self, candidate: Originals) -> bool:
        try:
            self._store.save(candidate)
        except OSError as err:
            self._metrics.state_write_failures.labels("originals").inc()
            problem = f"cannot save {self._store.path}: {err.strerror or err}"
            if problem != self.record_problem:  # once per new problem, not once per tick
                self._log.error(
                    "originals_record_write_failed",
                    path=str(self._store.path),
                    error=problem,
                    action="limits not recorded are left unchanged; retrying every tick",
                )
            self.record_problem = problem
            return False
        if self.record_problem is not None:
            self._log.warning("originals_record_write_recovered", path=str(self._store.path))
        self.record_problem = None
        self.originals = candidate
        return True

    def _write_one(self, index: int, watts: float) -> str | None:
        try:
            self._backend.set_power_limit_w(index, watts)
        except GpuError as err:
            self._metrics.actuation_errors.labels("power", type(err).__name__).inc()
            self._log.error("power_limit_write_failed", gpu=index, limit_w=watts, error=str(err))
            return str(err)
        self._gpus[index] = replace(self._gpus[index], power_limit_w=watts)
        return None

    def apply(
        self,
        writes: Sequence[tuple[int, float]],
        may_raise: Callable[[], bool] | None = None,
    ) -> WriteResult:
        """Write every lowering at once, then the raises: the applied sum never passes through
        a state above both the old and the new one, and a budget cut costs one set-call latency
        rather than one per GPU. A failed write is counted and logged; the other lowerings
        still go out, and a raise only while the sum of the limits stays within the sum the
        plan ends at (a failed lowering leaves less room: raises that do not fit are `held`).

        With `may_raise`, raises go out one at a time and each only while it still answers
        True (asked just before the write, from this thread): a budget that arrived during the
        writes stops the raises not yet sent, which are reported as `held`."""
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
        recorded = self._record([i for i, _ in plan])
        for index, _ in plan:
            if index not in recorded:
                failed[index] = "not written: its original limit could not be recorded"
        plan = [(i, w) for i, w in plan if i in recorded]
        lowers = [(i, w) for i, w in plan if w < self._gpus[i].power_limit_w]
        raises = [(i, w) for i, w in plan if w >= self._gpus[i].power_limit_w]
        # The sum the plan ends at: a raise goes out only while the sum stays within it, so a
        # lowering that failed never has a raise stacked on top of it.
        planned_sum_w = self._sum_w() + sum(w - self._gpus[i].power_limit_w for i, w in plan)
        held: dict[int, float] = {}
        self._write_phase(lowers, applied, failed)
        fitting: list[tuple[int, float]] = []
        projected_w = self._sum_w()
        for index, watts in raises:
            after_w = projected_w + watts - self._gpus[index].power_limit_w
            if after_w > planned_sum_w + 1e-6:
                held[index] = watts
            else:
                fitting.append((index, watts))
                projected_w = after_w
        if may_raise is not None:
            for index, watts in fitting:
                if not may_raise():
                    held[index] = watts
                    continue
                self._write_phase([(index, watts)], applied, failed)
            return WriteResult(applied, failed, held)
        self._write_phase(fitting, applied, failed)
        return WriteResult(applied, failed, held)

    def _sum_w(self) -> float:
        return sum(g.power_limit_w for g in self._gpus.values())

    def _write_phase(
        self, phase: list[tuple[int, float]], applied: dict[int, float], failed: dict[int, str]
    ) -> None:
        """Write `phase` at once (in parallel), noting each outcome."""
        if phase:
            if len(phase) == 1:
                errors = [self._write_one(*phase[0])]
            else:
                errors = list(self._pool().map(lambda item: self._write_one(*item), phase))
            for (index, watts), error in zip(phase, errors, strict=True):
                if error is None:
                    applied[index] = watts
                else:
                    failed[index] = error

    def restore(
        self, targets_w: dict[int, float], uuids: Mapping[int, str] | None = None
    ) -> WriteResult:
        """Put recorded limits back (exit, start-up after a crash, `palsd restore`): read the
        GPUs afresh, clamp, count, lowerings first so a mix never overshoots in between, and a
        limit already in place (within 0.5 W) is not written. Records nothing: these are the
        originals. A failed write is logged and reported; the rest still go back.

        A target whose recorded UUID (`uuids`, by record index) is on the host goes to that
        GPU, wherever NVML numbers it now (a GPU that fell off the bus renumbers the ones
        after it); one whose GPU is not on the host is not written: its index may now be
        another card, whose limit is not this one. Results are keyed by record index."""
        present: dict[int, GpuObservation] | None = None
        try:
            fresh = self._backend.read_all()
            self.know(fresh)
            present = {g.index: g for g in fresh}
        except GpuError as err:  # then write every target: what is in force is not known
            self._log.warning("gpu_read_failed_before_restore", error=str(err))
        at_uuid = {g.uuid: i for i, g in (present or {}).items() if g.uuid}
        applied: dict[int, float] = {}
        failed: dict[int, str] = {}
        plan: list[tuple[int, int, float]] = []  # (record index, index now, watts)
        for index, watts in targets_w.items():
            uuid = (uuids or {}).get(index, "")
            at = at_uuid.get(uuid, index) if uuid else index
            gpu = None if present is None else present.get(at)
            if present is not None and (gpu is None or (uuid and gpu.uuid != uuid)):
                # Removed, or the host renumbered: writing this index could hit no GPU or the
                # wrong one. It stays recorded.
                failed[index] = (
                    f"GPU {uuid} is not on the host now" if uuid else "no GPU with this index now"
                )
                self._log.error("power_limit_restore_failed", gpu=index, error=failed[index])
                continue
            if gpu is not None:
                if abs(gpu.power_limit_w - watts) <= 0.5:
                    applied[index] = watts
                    continue
                watts = clamp_limit_w(watts, gpu)
            elif index in self._gpus:  # no fresh read: clamp to what was last known
                watts = clamp_limit_w(watts, self._gpus[index])
            plan.append((index, at, watts))
        now = {i: g.power_limit_w for i, g in self._gpus.items()}
        plan.sort(key=lambda item: item[2] - now.get(item[1], item[2]))
        self._metrics.limit_writes.inc(len(plan))
        for index, at, watts in plan:
            try:
                self._backend.set_power_limit_w(at, watts)
            except GpuError as err:
                self._metrics.actuation_errors.labels("power", type(err).__name__).inc()
                self._log.error("power_limit_restore_failed", gpu=at, limit_w=watts, error=str(err))
                failed[index] = str(err)
                continue
            if at in self._gpus:
                self._gpus[at] = replace(self._gpus[at], power_limit_w=watts)
            self._log.info("power_limit_restored", gpu=at, limit_w=watts)
            applied[index] = watts
        return WriteResult(applied, failed)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="power-write")
        return self._executor
