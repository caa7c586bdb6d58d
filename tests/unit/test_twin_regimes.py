"""tokens/J against the power cap at a saturating load (palsd.sim.characterise): the curve, its
writer (JSON + PNG, which `palsd simulate` puts beside each report), and the regimes the shipped
presets span (docs/twin.md, "Where the optimum cap lies")."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

from palsd.sim.characterise import EfficiencyCurve, efficiency_curve, write_efficiency_curve


@functools.cache
def curve(gpu: str, model: str) -> EfficiencyCurve:
    return efficiency_curve(gpu, model)


def test_curve_spans_the_limit_range_in_steps_of_at_most_50_w() -> None:
    c = curve("a100", "qwen-moe")
    caps = [p.cap_w for p in c.points]
    assert caps[0] == 100.0 and caps[-1] == 400.0
    assert all(0 < b - a <= 50.0 for a, b in itertools.pairwise(caps))
    # a cap is a ceiling: measured power never sits above it (1% for the cap loop's settling)
    assert all(p.power_w <= p.cap_w * 1.01 for p in c.points)
    # host power on top lowers tokens/J everywhere
    assert all(h < g for h, g in zip(c.tokens_per_j(True), c.tokens_per_j(False), strict=True))


def test_writer_saves_json_and_png(tmp_path: Path) -> None:
    js, png = write_efficiency_curve(curve("a100", "qwen-moe"), tmp_path)
    data = json.loads(js.read_text())
    assert data["gpu"] == "a100" and data["model"] == "qwen-moe"
    assert set(data["regime"]) == {"host", "gpu"}
    assert {"cap_w", "tokens_per_joule", "tokens_per_joule_host"} <= set(data["points"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pals_qwen_point_interior_optimum_at_half_tdp_on_a100() -> None:
    """PALS: Qwen1.5-MoE peaks at a 200 W cap on an A100 (50% of TDP)."""
    c = curve("a100", "qwen-moe")
    assert c.regime(host=True) == "interior"
    assert abs(c.optimum_cap_w(host=True) - 200) <= 50


def test_compute_heavy_70b_is_best_near_the_floor() -> None:
    """A dense 70B at a saturating load is compute-heavy: energy per FLOP falls with the
    voltage nearly all the way down, so GPU-only tokens/J is best within 50 W of the floor."""
    c = curve("h100", "dense-70b")
    assert c.regime(host=False) == "floor" and c.optimum_cap_w(host=False) <= 250


def test_host_power_moves_the_hopper_optimum_off_the_floor() -> None:
    """Mixtral on an H100: GPU-only tokens/J is best 50 W above the floor; with PALS's host
    power on top, throughput is worth more and the optimum moves inside the range."""
    c = curve("h100", "mixtral-8x7b")
    assert c.regime(host=False) == "floor"
    assert c.regime(host=True) == "interior"
    assert c.optimum_cap_w(host=True) > c.optimum_cap_w(host=False)
