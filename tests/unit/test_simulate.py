"""`palsd simulate` end to end on the real twin, short: the report's shape and the budget rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palsd.cli.palsd import main as palsd_main
from palsd.sim.scenarios import build_scenario

KEYS = {
    "tokens_per_joule",
    "slo_attainment",
    "slo_violation_windows",
    "seconds_above_budget",
    "seconds_power_above_budget",
    "seconds_limits_above_budget",
    "tokens",
    "energy_j",
    "speed_x_real_time",
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["strict", "demand_response"])
def test_short_simulate_writes_a_report_and_palsd_stays_within_budget(
    tmp_path: Path, scenario: str
) -> None:
    out = tmp_path / scenario
    rc = palsd_main(
        ["simulate", "--scenario", scenario, "--hours", "0.05", "--seed", "3", "--out", str(out)]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == {"default", "static", "cap_only", "batch_only", "palsd"}
    for name, pol in report["policies"].items():
        assert set(pol) >= KEYS, name
        assert pol["tokens"] > 0 and pol["energy_j"] > 0
        assert 0.0 <= pol["slo_attainment"] <= 1.0
    assert report["policies"]["palsd"]["seconds_above_budget"] == 0
    assert (out / "report.md").read_text().count("| palsd |") == 1
    assert (out / "power.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0


def test_traces_step_through_the_same_fractions_of_any_run_length() -> None:
    dr = build_scenario("demand_response", seed=1)
    assert dr.budget.at(0.0, 3600.0) == 5600.0
    assert dr.budget.at(1800.0, 3600.0) == dr.budget.at(9.0, 18.0)
    assert min(w for _, w in dr.budget.steps if w is not None) >= 8 * 200.0  # stays feasible
    price = build_scenario("price", seed=1)
    assert price.price_per_mwh is not None and len(price.price_per_mwh.steps) == 12
    assert price.budget.change_times_s(3600.0)
