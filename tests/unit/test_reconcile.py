"""Start-up after a crash: what this run controls is adopted (no lift above the budget before
the first tick), the rest goes back at once, and the record on disk never loses an entry."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import structlog

from palsd.act.memory import MemoryBatchPort
from palsd.act.originals import Originals, OriginalsStore
from palsd.act.power import PowerActuator
from palsd.report.metrics import Metrics
from palsd.runtime.run_cli import reconcile
from palsd.sense.memory import MemoryHost


def _left_behind(store: OriginalsStore) -> None:
    """A killed run's record: GPUs 0-1 of this host, GPU 1 now a different card, a GPU this
    host no longer has, a server still configured and one that is not."""
    store.save(
        Originals(
            gpus={
                0: {"uuid": "GPU-0000", "limit_w": 700.0},
                1: {"uuid": "GPU-9999", "limit_w": 650.0},
                5: {"uuid": "GPU-0005", "limit_w": 700.0},
            },
            servers={
                "kept": {"url": "http://kept", "batch_limit": 256},
                "gone": {"url": "http://gone", "batch_limit": 128},
            },
        )
    )


def test_a_killed_runs_record_is_adopted_for_what_this_run_controls(tmp_path: Path) -> None:
    host = MemoryHost(2)
    host.gpus = {i: replace(g, power_limit_w=300.0) for i, g in host.gpus.items()}  # lowered
    store = OriginalsStore(tmp_path)
    _left_behind(store)
    actuator = PowerActuator(host, store, Metrics(), structlog.get_logger("t"), dry_run=False)
    kept = MemoryBatchPort(limit=8)

    asyncio.run(reconcile(store, actuator, {"kept": kept}, host.read_all(), structlog.get_logger()))

    # GPU 0 is this run's: left at the lowered limit, its true original kept for the exit.
    assert host.gpus[0].power_limit_w == 300.0
    assert actuator.originals.gpus[0]["limit_w"] == 700.0
    # GPU 1 is another card now: its recorded value goes back at once.
    assert (1, 650.0) in host.writes and 1 not in actuator.originals.gpus
    assert kept.sets == [] and actuator.originals.servers["kept"]["batch_limit"] == 256
    # What could not go back (no GPU 5 here, no port for "gone") stays recorded, on disk too.
    on_disk = store.load()
    assert on_disk is not None
    assert sorted(on_disk.gpus) == [0, 5] and sorted(on_disk.servers) == ["gone", "kept"]
    assert on_disk.to_json() == actuator.originals.to_json()
