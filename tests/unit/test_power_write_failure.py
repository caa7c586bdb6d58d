"""A setter that raises mid-way through a write: the raises after a failed lowering must not
take the sum of the limits above what the plan allowed (the budget the plan was fitted to)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.errors import GpuLost
from palsd.report.metrics import Metrics
from palsd.sense.memory import MemoryHost


class FailsOn(MemoryHost):
    """A host whose set call raises for the GPUs in `broken`."""

    def __init__(self, n: int, broken: set[int]) -> None:
        super().__init__(n)
        self.broken = broken

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if index in self.broken:
            raise GpuLost(f"GPU {index} fell off the bus")
        super().set_power_limit_w(index, watts)


def _actuator(tmp_path: Path, host: MemoryHost) -> PowerActuator:
    actuator = PowerActuator(
        host, OriginalsStore(tmp_path), Metrics(), structlog.get_logger("test"), False
    )
    actuator.know(host.read_all())
    return actuator


@pytest.mark.parametrize("may_raise", [None, lambda: True])
def test_power_raise_is_held_when_a_lowering_failed(tmp_path, may_raise):
    host = FailsOn(2, broken={0})
    host.gpus[0] = replace(host.gpus[0], power_limit_w=600.0)
    host.gpus[1] = replace(host.gpus[1], power_limit_w=300.0)
    actuator = _actuator(tmp_path, host)
    # A 900 W plan: move 300 W from GPU 0 to GPU 1. GPU 0's lowering fails.
    result = actuator.apply([(0, 300.0), (1, 600.0)], may_raise)
    assert 0 in result.failed
    assert host.limit_sum_w() <= 900.0  # was 1200 W: the raise went out over the failed lowering
    assert host.gpus[1].power_limit_w == 300.0
    assert result.held == {1: 600.0}


def test_power_raise_that_still_fits_goes_out_after_a_failed_lowering(tmp_path):
    host = FailsOn(4, broken={0})
    for i, w in ((0, 600.0), (1, 300.0), (2, 500.0), (3, 300.0)):
        host.gpus[i] = replace(host.gpus[i], power_limit_w=w)
    actuator = _actuator(tmp_path, host)
    # A 1600 W plan: 0 -> 500 (fails), 2 -> 300, 1 -> 350, 3 -> 450. After the lowerings
    # 1500 W in force: GPU 1's raise still fits (1550 W), GPU 3's would not (1700 W).
    result = actuator.apply([(0, 500.0), (2, 300.0), (1, 350.0), (3, 450.0)], lambda: True)
    assert result.applied == {2: 300.0, 1: 350.0}
    assert result.held == {3: 450.0}
    assert host.limit_sum_w() == 1550.0
    # Once the GPU takes writes again, every write goes out.
    host.broken = set()
    result = actuator.apply([(0, 500.0), (3, 450.0)], lambda: True)
    assert result.applied == {0: 500.0, 3: 450.0} and not result.held
    assert host.limit_sum_w() == 1600.0
