"""`palsd simulate` end to end on the real twin, short: the report's shape, the budget rule on
drawn power, and scenario loads derived from the twin's own capacity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palsd.cli.palsd import main as palsd_main
from palsd.sim.scenarios import (
    MODELS,
    build_scenario,
    server_rates_per_s,
    static_capacity_per_s,
)

KEYS = {
    "tokens_per_joule",
    "slo_attainment",
    "slo_violation_windows",
    "seconds_above_budget",
    "seconds_power_above_budget",
    "seconds_limits_above_budget",
    "seconds_instant_above_budget",
    "tokens",
    "energy_j",
    "speed_x_real_time",
}


def test_short_strict_run_writes_a_report_and_palsd_never_draws_above_the_budget(
    tmp_path: Path,
) -> None:
    # 3 virtual minutes under the strict budget: long enough for palsd to leave its cold-start
    # guard (60 s) and for static's cap-loop overshoot to show; all five policies, two processes.
    out = tmp_path / "strict"
    rc = palsd_main(
        ["simulate", "--scenario", "strict", "--hours", "0.05", "--seed", "3", "--out", str(out)]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    pol = report["policies"]
    assert set(pol) == {"default", "static", "cap_only", "batch_only", "palsd"}
    for name, p in pol.items():
        assert set(p) >= KEYS, name
        assert p["tokens"] > 0 and p["energy_j"] > 0
        assert 0.0 <= p["slo_attainment"] <= 1.0
    # The hard rule, measured on drawn power (the 1 s average) as well as on the limits.
    assert pol["palsd"]["seconds_above_budget"] == 0
    # The scenario does stress the budget: static's limits sum to it and its draw pokes above.
    assert pol["static"]["seconds_power_above_budget"] > 0
    assert pol["default"]["seconds_limits_above_budget"] > 0
    assert (out / "report.md").read_text().count("| palsd |") == 1
    assert (out / "power.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0


def test_scenario_loads_are_relative_to_the_twins_measured_static_capacity() -> None:
    setup = MODELS["mixtral"]
    strict = build_scenario("strict", seed=1)
    assert strict.static_cap_w() == pytest.approx(0.43 * 700.0)
    capacity = static_capacity_per_s(setup.model, setup.tp, strict.static_cap_w())
    assert 5.0 < capacity < 30.0  # requests/s of one TP=2 Mixtral server at batch 64
    rates = server_rates_per_s(setup, strict, 4)
    assert rates[0] == pytest.approx(strict.utilisation * capacity)
    assert rates == sorted(rates, reverse=True)
    assert build_scenario("efficiency", 1).utilisation < strict.utilisation < 1.0


def test_traces_step_through_the_same_fractions_of_any_run_length() -> None:
    dr = build_scenario("demand_response", seed=1)
    assert dr.budget.at(0.0, 3600.0) == 5600.0
    assert dr.budget.at(1800.0, 3600.0) == dr.budget.at(9.0, 18.0)
    assert min(w for _, w in dr.budget.steps if w is not None) >= 8 * 200.0  # stays feasible
    price = build_scenario("price", seed=1)
    assert price.price_per_mwh is not None and len(price.price_per_mwh.steps) == 12
    assert price.budget.change_times_s(3600.0)
