"""The joint controller's operator keys reach it: nothing in `control` is silently ignored."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from palsd.config import ControlConfig, PalsdConfig
from palsd.core.controller import JointController
from palsd.runtime.wiring import make_controller


def test_control_keys_reach_the_joint_controller() -> None:
    cfg = PalsdConfig(
        control=ControlConfig(
            controller="joint",
            max_raise_w_per_tick=30.0,
            joint={"host_fixed_w": 500.0, "dwell_s": 12.0, "low_margin": 0.05},
        )
    )
    ctrl = make_controller(cfg)
    assert isinstance(ctrl, JointController)
    p = ctrl.params
    assert p.max_raise_w_per_tick == 30.0
    assert (p.host_fixed_w, p.dwell_s, p.low_margin) == (500.0, 12.0, 0.05)
    assert p.high_margin == 0.50  # untouched keys keep their defaults


def test_unlimited_raise_is_passed_as_none() -> None:
    cfg = PalsdConfig(control=ControlConfig(controller="joint", max_raise_w_per_tick=None))
    ctrl = make_controller(cfg)
    assert isinstance(ctrl, JointController)
    assert ctrl.params.max_raise_w_per_tick is None


def test_margins_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="high_margin must be above"):
        ControlConfig(joint={"low_margin": 0.3, "high_margin": 0.2})
