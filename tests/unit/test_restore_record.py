"""Putting limits back when the originals record cannot be updated (read-only or full state
directory): the limits that went back are back, whatever the disk says. The restore says which
file is left and what it still holds, and a later restore from that file is correct."""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import replace
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from palsd.act.originals import Originals, OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.report.metrics import Metrics
from palsd.sense.memory import MemoryHost


class ReadOnlyStore(OriginalsStore):
    """The state directory remounted read-only after the record was written."""

    def save(self, originals: Originals) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.path))

    def clear(self) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.path))


def _recorded(tmp_path: Path) -> tuple[MemoryHost, Originals]:
    """Two GPUs palsd lowered from 700 W to 300 W, their originals on disk."""
    host = MemoryHost(2)
    record = Originals(gpus={i: {"uuid": f"GPU-{i:04d}", "limit_w": 700.0} for i in (0, 1)})
    OriginalsStore(tmp_path).save(record)
    for i in (0, 1):
        host.gpus[i] = replace(host.gpus[i], power_limit_w=300.0)
    return host, record


def _put_back(host: MemoryHost, store: OriginalsStore, record: Originals) -> dict[int, float]:
    log = structlog.get_logger("test")
    actuator = PowerActuator(host, store, Metrics(), log, dry_run=False)
    return asyncio.run(put_back(record, store, actuator, {}, log)).applied


def test_limits_back_but_record_left_is_a_warning_naming_the_file(tmp_path):
    host, record = _recorded(tmp_path)
    store = ReadOnlyStore(tmp_path)
    with capture_logs() as logs:
        applied = _put_back(host, store, record)  # used to raise OSError: exit 1, "failed"
    assert applied == {0: 700.0, 1: 700.0}
    assert {i: g.power_limit_w for i, g in host.gpus.items()} == {0: 700.0, 1: 700.0}
    assert record.empty()  # nothing is left to put back
    left = [e for e in logs if e["event"] == "originals_record_left"]
    assert len(left) == 1 and left[0]["log_level"] == "warning"
    assert left[0]["path"] == str(store.path) and "Read-only" in left[0]["error"]

    # The file still holds the originals: a later restore writes nothing new and removes it.
    writes = len(host.writes)
    again = OriginalsStore(tmp_path).load()
    assert again is not None and set(again.gpus) == {0, 1}
    assert _put_back(host, OriginalsStore(tmp_path), again) == {0: 700.0, 1: 700.0}
    assert len(host.writes) == writes
    assert not store.path.exists()


def test_a_record_whose_card_is_gone_writes_nothing_to_the_card_now_at_its_index(tmp_path):
    """`palsd restore` after a card swap: index 1 is now another card (GPU-0009). The old
    card's original is not this card's, so it is not written; it stays recorded (the restore
    names it as not back) while GPU 0 goes back."""
    host, record = _recorded(tmp_path)
    host.gpus[1] = replace(host.gpus[1], uuid="GPU-0009")
    assert _put_back(host, OriginalsStore(tmp_path), record) == {0: 700.0}
    assert host.writes == [(0, 700.0)] and host.gpus[1].power_limit_w == 300.0
    assert sorted(record.gpus) == [1]
