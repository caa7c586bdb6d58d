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
from palsd.act.restore import put_back
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
    # GPU 1 is another card now: the old card's limit is not its own, so nothing is written
    # to it, and the entry is dropped (this run records the new card's own original).
    assert host.writes == [] and 1 not in actuator.originals.gpus
    assert kept.sets == [] and actuator.originals.servers["kept"]["batch_limit"] == 256
    # What could not go back (no GPU 5 here, no port for "gone") stays recorded, on disk too.
    on_disk = store.load()
    assert on_disk is not None
    assert sorted(on_disk.gpus) == [0, 5] and sorted(on_disk.servers) == ["gone", "kept"]
    assert on_disk.to_json() == actuator.originals.to_json()


def test_a_gpu_renumbered_after_another_left_the_bus_gets_its_own_limit_back(
    tmp_path: Path,
) -> None:
    """Three cards recorded; the middle one fell off the bus, so NVML now numbers the third
    as GPU 1. Its original goes back to it at index 1, the lost card's is written nowhere,
    and at exit every card present gets its own original."""
    store = OriginalsStore(tmp_path)
    store.save(
        Originals(
            gpus={
                0: {"uuid": "GPU-0000", "limit_w": 700.0},
                1: {"uuid": "GPU-0001", "limit_w": 650.0},
                2: {"uuid": "GPU-0002", "limit_w": 600.0},
            }
        )
    )
    host = MemoryHost(2)
    host.gpus = {
        0: replace(host.gpus[0], power_limit_w=300.0),
        1: replace(host.gpus[1], uuid="GPU-0002", power_limit_w=300.0),
    }
    actuator = PowerActuator(host, store, Metrics(), structlog.get_logger("t"), dry_run=False)

    asyncio.run(reconcile(store, actuator, {}, host.read_all(), structlog.get_logger()))

    assert host.writes == [(1, 600.0)]  # the third card's own original, where it is now
    assert sorted(actuator.originals.gpus) == [0]  # GPU 0 adopted; nothing left for index 1
    on_disk = store.load()
    assert on_disk is not None and sorted(on_disk.gpus) == [0]

    asyncio.run(put_back(actuator.originals, store, actuator, {}, structlog.get_logger()))
    assert {i: g.power_limit_w for i, g in host.gpus.items()} == {0: 700.0, 1: 600.0}
    assert all(w != 650.0 for _, w in host.writes)
