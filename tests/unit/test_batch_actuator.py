"""One server's batch limit, reconciled (palsd/act/batch_actuator.py), over an in-memory endpoint
that answers like the plugin or fails like a missing, half-installed, locked or dead one."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from palsd.act.batch import (
    BatchLimitEnginePluginMissing,
    BatchLimitError,
    BatchLimitPluginMissing,
    BatchLimitUnauthorized,
    BatchLimitUnavailable,
)
from palsd.act.batch_actuator import BatchActuator
from palsd.act.memory import MemoryBatchPort
from palsd.core.types import BatchControl
from palsd.report.logs import get_logger
from palsd.report.metrics import Metrics


def make(
    port: MemoryBatchPort,
    *,
    record: bool = True,
    dry_run: bool = False,
    max_limit: int | None = None,
) -> tuple[BatchActuator, list[tuple[str, int]]]:
    recorded: list[tuple[str, int]] = []

    def record_original(name: str, url: str, limit: int) -> bool:
        if record:
            recorded.append((name, limit))
        return record

    actuator = BatchActuator(
        "s0",
        "http://s0",
        port,
        log=get_logger(),
        metrics=Metrics(),
        record_original=record_original,
        dry_run=dry_run,
        poll_s=0.5,
        max_limit=max_limit,
    )
    return actuator, recorded


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_reads_first_records_the_original_then_writes_what_is_wanted():
    port = MemoryBatchPort(limit=256)
    batch, recorded = make(port)
    batch.want(8)
    await batch.step()  # nothing is written before the server's own limit is known
    assert port.sets == [] and batch.view().limit == 256
    await batch.step()
    assert port.sets == [8] and recorded == [("s0", 256)]
    assert batch.view().limit == 8 and batch.view().control is BatchControl.OK
    await batch.step()  # in step: a read, no write
    assert port.sets == [8] and port.gets == 2


async def test_a_server_that_came_back_at_another_limit_is_corrected_and_logged():
    port = MemoryBatchPort(limit=256)
    batch, _ = make(port)
    batch.want(8)
    await batch.step()
    await batch.step()
    port.limit = 256  # restarted: back at its own default
    with capture_logs() as logs:
        await batch.step()  # the read shows what the server holds, not palsd's wish
        assert batch.view().limit == 256
        await batch.step()
    assert port.sets == [8, 8] and batch.view().limit == 8
    [corrected] = events(logs, "batch_limit_corrected")
    assert corrected["found"] == 256 and corrected["limit"] == 8 and corrected["set_before"] == 8


async def test_no_write_while_the_original_cannot_be_recorded():
    port = MemoryBatchPort(limit=256)
    batch, _ = make(port, record=False)
    batch.want(8)
    for _ in range(3):
        await batch.step()
    assert port.sets == []


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (BatchLimitPluginMissing("u", "HTTP 404: no batch-limit endpoint"), "plugin_missing"),
        (BatchLimitEnginePluginMissing("u", "HTTP 501: engine half"), "engine_plugin_missing"),
        (BatchLimitUnauthorized("u", "HTTP 401: bad token"), "unauthorised"),
        (BatchLimitUnavailable("u", "unreachable (ConnectError)"), "unreachable"),
    ],
)
async def test_each_failure_is_a_state_logged_once_with_backoff(error: BatchLimitError, state):
    port = MemoryBatchPort(limit=256)
    batch, _ = make(port)
    batch.want(8)
    port.fail = error
    pauses = []
    with capture_logs() as logs:
        for _ in range(7):
            await batch.step()
            pauses.append(batch._pause_s())
        view = batch.view()
        assert view.control.value == state and view.limit is None
        assert view.reason is not None and str(error.detail) in view.reason
        assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # capped
        port.fail = None
        batch.retry_soon()  # the server's metrics answer again: ask now
        assert batch._pause_s() == 0.0
        await batch.step()
    changes = events(logs, "batch_control_changed")
    assert [(c["state"], c["log_level"]) for c in changes] == [
        (state, "warning"),
        ("ok", "warning"),
    ]
    assert port.sets == [] and batch.view().limit == 256  # cap-only while it failed
    await batch.step()
    assert port.sets == [8]


async def test_a_refused_value_is_not_retried_until_the_wish_changes():
    port = MemoryBatchPort(limit=8, max_num_seqs=8)
    batch, _ = make(port)
    await batch.step()
    port.max_num_seqs = 4  # the server shrank under us; palsd still believes 8 is allowed
    batch.want(6)
    with capture_logs() as logs:
        await batch.step()
        await batch.step()
    assert len(events(logs, "batch_limit_write_failed")) == 1
    assert batch.view().control is BatchControl.OK
    batch.want(3)
    await batch.step()
    assert port.sets == [3]


async def test_wishes_are_clamped_to_the_server_and_the_configured_range():
    port = MemoryBatchPort(limit=8, max_num_seqs=16)
    batch, _ = make(port, max_limit=12)
    await batch.step()
    batch.want(64)
    await batch.step()
    assert port.sets == [12]


async def test_dry_run_says_what_it_would_set_once_and_sets_nothing():
    port = MemoryBatchPort(limit=256)
    batch, recorded = make(port, dry_run=True)
    await batch.step()
    batch.want(8)
    with capture_logs() as logs:
        for _ in range(4):
            await batch.step()
    assert port.sets == [] and recorded == []
    assert [e["limit"] for e in events(logs, "would_set_batch_limit")] == [8]
