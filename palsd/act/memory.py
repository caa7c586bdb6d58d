"""An in-memory batch-limit endpoint (the BatchPort of act/batch_actuator.py), shared by tests
and benchmarks: it answers like palsd's vLLM plugin, or fails the way `fail` says."""

from __future__ import annotations

from palsd.act.batch import BatchLimitError, BatchLimitRejected, BatchLimitState


class MemoryBatchPort:
    def __init__(self, limit: int = 256, max_num_seqs: int = 256) -> None:
        self.limit = limit
        self.max_num_seqs = max_num_seqs
        self.fail: BatchLimitError | None = None  # raised by every call while set
        self.gets = 0
        self.sets: list[int] = []

    def _state(self) -> BatchLimitState:
        return BatchLimitState(self.max_num_seqs, self.limit, running=0, waiting=0)

    async def get(self) -> BatchLimitState:
        self.gets += 1
        if self.fail is not None:
            raise self.fail
        return self._state()

    async def set(self, limit: int) -> BatchLimitState:
        if self.fail is not None:
            raise self.fail
        if not 1 <= limit <= self.max_num_seqs:
            raise BatchLimitRejected("memory", f"limit must be between 1 and {self.max_num_seqs}")
        self.sets.append(limit)
        self.limit = limit
        return self._state()
