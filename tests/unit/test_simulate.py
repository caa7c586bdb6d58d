"""`palsd simulate` end to end on the real twin, short: the report's shape, the budget rule on
drawn power, and scenario loads derived from the twin's own capacity."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from palsd.cli.palsd import main as palsd_main
from palsd.core.types import Quantiles
from palsd.sense.vllm_metrics import parse_metrics
from palsd.sim.report import pick_best_fixed
from palsd.sim.scenarios import (
    MODELS,
    build_host,
    build_scenario,
    capacity_per_s,
    server_rates_per_s,
    sweep_caps_w,
)
from palsd.sim.simulate import RunResult, fixed_pair_of
from palsd.sim.simulate_cli import SimJob, SweepChain, SweepPlan, sweep_pairs

KEYS = {
    "tokens_per_joule",
    "tokens_per_joule_host",
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
    # 2 virtual minutes under the strict budget, the five policies and best_fixed's sweep (its
    # pairs whose caps fit the budget), two processes.
    out = tmp_path / "strict"
    rc = palsd_main(
        ["simulate", "--scenario", "strict", "--hours", "0.033", "--seed", "3", "--out", str(out)]
    )
    report = json.loads((out / "report.json").read_text())
    # The exit status is the targets' verdict.
    assert rc == (0 if all(t["met"] for t in report["targets"]) else 1)
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"palsd"}
    pol = report["policies"]
    assert set(pol) >= {"default", "static", "cap_only", "batch_only", "palsd"}
    for name, p in pol.items():
        assert set(p) >= KEYS, name
        assert p["tokens"] > 0 and p["energy_j"] > 0
        assert p["tokens_per_joule_host"] < p["tokens_per_joule"]  # host power on top
        assert 0.0 <= p["slo_attainment"] <= 1.0
    assert set(report["best_fixed"]) >= {"cap_w", "batch_limit", "feasible"}
    # The hard rule, measured on drawn power (the 1 s average) as well as on the limits. The
    # twin's cap loop now regulates the averaged power at 99% of the limit, as measured on an
    # H200 (docs/twin.md), so a load rise can carry the average ~1% over a cap for a moment (the
    # H100 runs saw 707 W at 700 W): the controller's guard band has to absorb that (issue 10).
    assert pol["palsd"]["seconds_above_budget"] <= 0.5
    # The scenario does stress the budget: default's limits are above it.
    assert pol["default"]["seconds_limits_above_budget"] > 0
    assert (out / "report.md").read_text().count("| palsd |") == 1
    assert (out / "power.png").stat().st_size > 0 and (out / "latency.png").stat().st_size > 0
    # the preset's tokens/J-against-cap curve beside the report, and its regime in it
    assert (out / "efficiency_curve.json").exists() and (out / "efficiency_curve.png").exists()
    assert report["efficiency_curve"]["regime"] in {"floor", "interior", "max"}


def test_the_sweep_skips_pairs_whose_caps_sum_above_the_lowest_budget() -> None:
    caps = sweep_caps_w("h100")
    assert caps[0] == 200.0 and caps[-1] == 700.0
    assert max(b - a for a, b in itertools.pairwise(caps)) <= 50.0
    run, skipped = sweep_pairs("h100", 8 * 300.0)
    assert {c for c, _ in run} == {200.0, 250.0, 300.0}
    assert {b for _, b in run} == {32, 64, 128, 256}
    assert len(run) + len(skipped) == len(caps) * 4
    assert sweep_pairs("h100", None)[1] == []


def test_best_fixed_is_the_most_efficient_feasible_pair() -> None:
    def p(tpj: float, att: float, above: float, aborted: bool = False) -> dict[str, object]:
        return {
            "tokens_per_joule_host": tpj,
            "slo_attainment": att,
            "seconds_above_budget": above,
            "aborted": aborted,
        }

    sweep = {
        "fixed_200_256": p(9.0, 0.95, 0.0),  # most efficient, misses the SLO
        "fixed_300_256": p(8.0, 0.995, 0.0),
        "fixed_250_256": p(8.5, 1.0, 0.3),  # above budget
        "fixed_350_128": p(7.0, 1.0, 0.0),
        "fixed_220_64": p(9.5, 1.0, 0.0, aborted=True),
    }
    assert pick_best_fixed(sweep) == "fixed_300_256"
    assert pick_best_fixed({"fixed_200_256": p(9.0, 0.5, 0.0)}) is None


def test_the_sim_reads_what_palsds_parser_reads_from_the_rendered_page() -> None:
    setup = MODELS["mixtral"]
    host = build_host(setup, build_scenario("efficiency", 1), seed=1)
    host.step(20.0)
    for server in range(len(host.servers)):
        assert host.scrape(server) == parse_metrics(host.metrics_text(server))


def test_scenario_loads_are_relative_to_the_twins_capacity_at_vllm_defaults() -> None:
    setup = MODELS["mixtral"]
    strict = build_scenario("strict", seed=1)
    capacity = capacity_per_s("h100", setup.model, setup.tp)
    at_64 = capacity_per_s("h100", setup.model, setup.tp, batch=64)
    assert capacity > at_64 > 1.0  # vLLM's default batch (256) serves more than PALS's 64
    rates = server_rates_per_s(setup, strict, 4)
    assert rates[0] == pytest.approx(strict.utilisation * capacity)
    assert rates == sorted(rates, reverse=True)


def test_traces_step_through_the_same_fractions_of_any_run_length() -> None:
    dr = build_scenario("demand_response", seed=1)
    assert dr.budget_w("h100", 0.0, 3600.0) == 5600.0
    assert dr.budget_w("h100", 1800.0, 3600.0) == dr.budget_w("h100", 9.0, 18.0)
    lowest = min(dr.budget_w("h100", s * 3600.0, 3600.0) or 0.0 for s, _ in dr.budget.steps)
    assert 8 * 200.0 < lowest <= 8 * 300.0  # feasible, and near the floor: it binds
    price = build_scenario("price", seed=1)
    assert price.price_per_mwh is not None and len(price.price_per_mwh.steps) == 12
    assert price.budget.change_times_s(3600.0)
    diurnal = build_scenario("diurnal", seed=1)
    assert diurnal.load_at(0.0) == pytest.approx(0.1) and diurnal.load_at(0.5) == 1.0
    mixed = build_scenario("mixed", seed=1)
    assert mixed.long_share is not None
    assert {s for _, s in mixed.long_share.steps} >= {0.0, 1.0}


def test_the_sims_window_gives_what_the_daemons_signal_window_gives() -> None:
    from palsd.sense.signals import SignalWindow
    from palsd.sim.simulate import _Sensor

    setup = MODELS["mixtral"]
    host = build_host(setup, build_scenario("efficiency", 1), seed=1)
    sensor = _Sensor(host, setup, seed=1, blind=False)
    window = SignalWindow()
    for tick in range(60):
        now_s = tick * 0.5
        window = window.push(now_s, host.scrape(0))
        theirs = window.report()
        ours = sensor.signals(0, now_s)
        assert theirs is not None
        assert ours.requests_per_s == pytest.approx(theirs.server.requests_per_s)
        assert ours.generation_tokens_per_s == pytest.approx(theirs.server.generation_tokens_per_s)
        assert ours.itl_s == theirs.server.itl_s and ours.ttft_s == theirs.server.ttft_s
        assert ours.prompt_tokens_per_s == pytest.approx(theirs.server.prompt_tokens_per_s)
        assert ours.e2e_s == Quantiles()  # left out: no controller reads it (test below)
        assert (ours.running, ours.waiting, ours.window_s) == (
            theirs.server.running,
            theirs.server.waiting,
            theirs.server.window_s,
        )
        host.step(0.5)


def test_the_controllers_decisions_do_not_depend_on_e2e_latency() -> None:
    # Why the simulation's sensor may leave the e2e histogram out: two controllers, fed the
    # same twin ticks except for e2e quantiles (none, and arbitrary ones), decide the same.
    from dataclasses import replace

    from palsd.core.controller import JointController
    from palsd.core.types import BudgetInForce, BudgetSource
    from palsd.sim.simulate import _Sensor

    setup = MODELS["mixtral"]
    host = build_host(setup, build_scenario("demand_response", 1), seed=1)
    sensor = _Sensor(host, setup, seed=1, blind=False)
    without, with_e2e = JointController(), JointController()
    budget = BudgetInForce(2000.0, BudgetSource.FACILITY)
    for tick in range(120):
        obs = sensor.observe(budget, tick * 0.5, None)
        e2e = Quantiles(p50=1.0 + tick, p90=2.0 + tick, p99=3.0 + tick)
        other = replace(
            obs,
            servers=tuple(
                replace(s, signals=None if s.signals is None else replace(s.signals, e2e_s=e2e))
                for s in obs.servers
            ),
        )
        a, b = without.decide(obs), with_e2e.decide(other)
        assert (a.power_limits_w, a.batch_limits, a.mode) == (
            b.power_limits_w,
            b.batch_limits,
            b.mode,
        )
        for index, limit_w in a.power_limits_w.items():
            host.set_power_limit_w(index, limit_w)
        host.step(0.5)


def _result(name: str, infeasible_by: str | None = None, stopped: bool = False) -> RunResult:
    aborted = stopped or infeasible_by is not None
    res = RunResult(name, aborted=aborted, stopped=stopped, infeasible_by=infeasible_by)
    if infeasible_by == "budget":
        res.seconds_above_budget = 0.1
    return res


def _drain(plan: SweepPlan, outcome: dict[str, str | None], speculate: int = 1) -> list[str]:
    """Run the plan with `speculate` runs in flight at once, finishing the oldest first; each
    run ends as `outcome` says (None: feasible). Returns the names in the order started."""
    started: list[str] = []
    flight: list[SimJob] = []
    while True:
        while len(flight) < speculate and (job := plan.next_job(speculate > 1)) is not None:
            started.append(job.name)
            flight.append(job)
        if not flight:
            return started
        job = flight.pop(0)
        below = job.pair is not None and any(
            c.batch == job.pair[1] and job.pair[0] < c.missed_w for c in plan.chains
        )
        plan.finished(job, _result(job.name, outcome.get(job.name), stopped=below))


def test_one_process_runs_the_sweep_top_down_and_stops_a_chain_at_its_first_slo_miss() -> None:
    chains = [SweepChain(256, [400.0, 350.0, 300.0, 250.0], 0), SweepChain(64, [400.0, 350.0], 1)]
    plan = SweepPlan(["palsd"], chains, {}, curve=False)
    outcome = {"fixed_350_256": "budget", "fixed_300_256": "slo", "fixed_400_64": "slo"}
    order = _drain(plan, outcome)
    # the policies first, then the chains from their highest cap; a budget abort goes on down
    assert order == [
        "palsd",
        "fixed_400_256",
        "fixed_350_256",
        "fixed_300_256",
        "fixed_400_64",
    ]
    assert {r.policy for r in plan.sweep_runs()} == set(order[1:])
    assert plan.not_run() == [(250.0, 256), (350.0, 64)]


def test_a_run_started_early_below_a_cap_that_misses_is_dropped_as_not_run() -> None:
    plan = SweepPlan([], [SweepChain(256, [400.0, 350.0, 300.0], 0)], {}, curve=False)
    order = _drain(plan, {"fixed_400_256": "slo"}, speculate=2)
    assert order[:2] == ["fixed_400_256", "fixed_350_256"]  # 350 before 400 is known
    assert [r.policy for r in plan.sweep_runs()] == ["fixed_400_256"]
    assert plan.not_run() == [(350.0, 256), (300.0, 256)]


def test_a_policy_that_is_a_sweep_pair_shares_its_run_with_it() -> None:
    chains = [SweepChain(256, [700.0, 650.0], 0, shared={700.0})]
    plan = SweepPlan(["default"], chains, {(700.0, 256): "default"}, curve=False)
    order = _drain(plan, {})
    assert order == ["default", "fixed_650_256"]  # 700 W / 256 is not run a second time
    assert {r.policy for r in plan.sweep_runs()} == {"fixed_700_256", "fixed_650_256"}
    assert [r.policy for r in plan.runs] == ["default"]
    # its SLO miss (the policy run goes on to the end) stops the chain like a sweep run's
    plan = SweepPlan(
        ["default"],
        [SweepChain(256, [700.0, 650.0], 0, shared={700.0})],
        {(700.0, 256): "default"},
        curve=False,
    )
    assert _drain(plan, {"default": "slo"}) == ["default"]
    assert plan.not_run() == [(650.0, 256)]


def test_blind_policies_are_recognised_as_the_fixed_pair_they_decide() -> None:
    efficiency, price = build_scenario("efficiency", 1), build_scenario("price", 1)
    assert fixed_pair_of("default", efficiency, 1, "mixtral", "h100", 360.0) == (700.0, 256)
    assert fixed_pair_of("default", price, 1, "mixtral", "h100", 360.0) == (700.0, 256)
    assert fixed_pair_of("static", efficiency, 1, "mixtral", "h100", 360.0) == (700.0, 64)
    # under a moving budget static's caps move with it: no one pair
    assert fixed_pair_of("static", price, 1, "mixtral", "h100", 360.0) is None
    assert fixed_pair_of("palsd", efficiency, 1, "mixtral", "h100", 360.0) is None
