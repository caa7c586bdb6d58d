"""No write without a durable record: the power actuator writes a GPU's limit only once the
originals record holding it is on disk, and keeps trying (and reporting) while it cannot be."""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.report.metrics import Metrics
from tests.unit.test_daemon import MemoryHost


def _failures(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "palsd_state_write_failures_total", {"file": "originals"}
    )
    return value or 0.0


def _actuator(state_dir: Path, host: MemoryHost) -> tuple[PowerActuator, Metrics]:
    metrics = Metrics()
    actuator = PowerActuator(
        host, OriginalsStore(state_dir), metrics, structlog.get_logger("test"), dry_run=False
    )
    actuator.know(host.read_all())
    return actuator, metrics


def test_unsaveable_record_means_no_write_a_counted_problem_and_a_retry(tmp_path: Path) -> None:
    # The state directory's path is taken by a regular file: every save fails with a real
    # OSError, the way a read-only or full state directory fails.
    state_dir = tmp_path / "state"
    state_dir.write_text("not a directory")
    host = MemoryHost(2)
    actuator, metrics = _actuator(state_dir, host)

    for attempt in (1, 2):
        result = actuator.apply([(0, 300.0), (1, 300.0)])
        assert result.applied == {}
        assert set(result.failed) == {0, 1}
        assert "could not be recorded" in result.failed[0]
        assert host.writes == []
        assert actuator.originals.empty(), "memory must hold only what is on disk"
        assert actuator.record_problem is not None and str(state_dir) in actuator.record_problem
        assert _failures(metrics) == attempt

    state_dir.unlink()  # the operator frees the state directory: the next apply succeeds
    result = actuator.apply([(0, 300.0), (1, 300.0)])
    assert result.applied == {0: 300.0, 1: 300.0}
    assert actuator.record_problem is None
    record = json.loads((state_dir / "originals.json").read_text())
    assert {k: v["limit_w"] for k, v in record["gpus"].items()} == {"0": 700.0, "1": 700.0}


def test_gpus_already_recorded_are_still_written_when_a_new_one_cannot_be(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    host = MemoryHost(2)
    actuator, _ = _actuator(state_dir, host)
    assert actuator.apply([(0, 300.0)]).applied == {0: 300.0}
    saved = (state_dir / "originals.json").read_bytes()

    (state_dir / "originals.json").unlink()
    state_dir.rmdir()
    state_dir.write_text("gone")  # from now on no save can succeed
    result = actuator.apply([(0, 250.0), (1, 250.0)])
    assert result.applied == {0: 250.0}, "GPU 0's original is on disk: restore can undo it"
    assert set(result.failed) == {1}
    assert host.gpus[1].power_limit_w == 700.0
    assert json.loads(saved)["gpus"] == {"0": {"limit_w": 700.0, "uuid": "GPU-0000"}}


def test_batch_original_is_recorded_durably_or_not_at_all(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.write_text("not a directory")
    actuator, metrics = _actuator(state_dir, MemoryHost(1))
    assert actuator.record_server("s0", "http://x", 256) is False
    assert actuator.originals.servers == {}
    state_dir.unlink()
    assert actuator.record_server("s0", "http://x", 256) is True
    record = json.loads((state_dir / "originals.json").read_text())
    assert record["servers"] == {"s0": {"batch_limit": 256, "url": "http://x"}}
    assert _failures(metrics) == 1
