"""The guard band under a binding budget and the feed-forward on the request mix: plain values,
no twin, no mocks (issue 10's strict, demand-response and mixed gaps)."""

from __future__ import annotations

import dataclasses

from palsd.core.controller import JointController, JointParams
from palsd.core.types import GpuObservation, ServerObservation, ServerSignals
from tests.unit.test_controller_fixtures import gpu, obs, server, signals


def test_a_lowered_limit_is_not_learned_as_an_overshoot():
    # Limits go from 700 W to 250 W; for a second the 1 s average still shows 400 W. That is
    # the average's lag, not the cap loop overshooting: the guard must not learn it (it once
    # planned 459 W below a 2000 W budget for ten minutes and starved every server).
    params = JointParams(cold_s=0.0)
    ctrl = JointController(params)
    servers = [server("s0", (0, 1), signals(itl_s=0.15))]
    ctrl.decide(
        obs(0.0, [gpu(0, 400.0, limit_w=700.0), gpu(1, 400.0, limit_w=700.0)], servers, 500)
    )
    ctrl.decide(
        obs(0.5, [gpu(0, 400.0, limit_w=250.0), gpu(1, 400.0, limit_w=250.0)], servers, 500)
    )
    settled = [gpu(0, 240.0, limit_w=240.0), gpu(1, 240.0, limit_w=240.0)]
    decision = ctrl.decide(obs(5.0, settled, servers, 500))
    guard = params.budget_guard_frac * 500
    assert sum(decision.power_limits_w.values()) >= 500 - guard - 1e-6


def test_the_first_plan_after_a_budget_cut_keeps_watts_per_gpu_for_the_first_burst():
    ctrl = JointController()
    gpus = [gpu(i, power_w=120.0, limit_w=700.0) for i in range(8)]
    servers = [server(f"s{k}", (2 * k, 2 * k + 1), signals(itl_s=0.15)) for k in range(4)]
    decision = ctrl.decide(obs(0.0, gpus, servers, 2000.0))
    cold = JointParams().cold_guard_w_per_gpu * 8
    assert sum(decision.power_limits_w.values()) <= 2000.0 - cold + 1e-6


def _short_of_latency() -> list[ServerObservation]:
    """Four servers missing their SLO: each wants every watt, so the budget binds."""
    sig = signals(itl_s=0.5, ttft_s=5.0, running=200, waiting=30)
    return [server(f"s{k}", (2 * k, 2 * k + 1), sig) for k in range(4)]


def _planned_w(
    ctrl: JointController,
    t: float,
    gpus: list[GpuObservation],
    servers: list[ServerObservation],
    budget_w: float,
) -> float:
    return sum(ctrl.decide(obs(t, gpus, servers, budget_w)).power_limits_w.values())


def _settled(
    ctrl: JointController,
    gpus: list[GpuObservation],
    servers: list[ServerObservation],
    budget_w: float,
) -> tuple[float, float]:
    """60 s of ticks at one budget, past every cold period: (the time, the last plan)."""
    t, planned = 0.0, 0.0
    for _ in range(120):
        t += 0.5
        planned = _planned_w(ctrl, t, gpus, servers, budget_w)
    return t, planned


def test_a_budget_raise_never_plans_below_the_plan_before_it():
    # Servers short of latency want every watt; the budget binds at 1800 W, then rises to
    # 2000 W. The caution after a new budget (the first burst at a lowered limit) must not make
    # the larger budget plan fewer watts than the smaller one did (it once planned 1680 W for
    # 5 s after 1706 W: every server lost watts when the facility gave more).
    ctrl, servers = JointController(), _short_of_latency()
    gpus = [gpu(i, power_w=220.0, limit_w=225.0) for i in range(8)]
    t, planned = _settled(ctrl, gpus, servers, 1800.0)
    assert planned < 1800.0  # the budget binds
    for _ in range(12):  # the first 6 s at 2000 W
        t += 0.5
        assert _planned_w(ctrl, t, gpus, servers, 2000.0) >= planned - 1e-6


def test_a_large_cut_keeps_the_first_burst_floor():
    ctrl = JointController()
    servers = [server(f"s{k}", (2 * k, 2 * k + 1), signals(itl_s=0.15)) for k in range(4)]
    gpus = [gpu(i, power_w=300.0, limit_w=700.0) for i in range(8)]
    t, _ = _settled(ctrl, gpus, servers, 5600.0)
    cold = JointParams().cold_guard_w_per_gpu * 8
    assert _planned_w(ctrl, t + 0.5, gpus, servers, 2000.0) <= 2000.0 - cold + 1e-6


def test_a_budget_moving_by_a_few_watts_every_tick_does_not_starve_the_host():
    # A fleet coordinator's rebalancing (or a jittery facility feed) moves the budget by a few
    # watts every few seconds. Each change is a new budget, but the caution after a cut is for
    # the first burst at limits that came down, which a 5 W cut barely does: the plan must stay
    # within the changes' size of the steady plan (it once sat 320 W below for as long as the
    # budget moved).
    ctrl, servers = JointController(), _short_of_latency()
    gpus = [gpu(i, power_w=220.0, limit_w=225.0) for i in range(8)]
    t, steady = _settled(ctrl, gpus, servers, 2000.0)
    assert steady < 2000.0  # the budget binds
    for k in range(120):  # 60 s of a budget moving between 1995 and 2000 W every tick
        t += 0.5
        budget = 1995.0 if k % 2 == 0 else 2000.0
        assert _planned_w(ctrl, t, gpus, servers, budget) >= steady - 2 * 5.0 - 1.0


def test_no_shedding_while_the_average_still_shows_the_limits_before_a_cut():
    # The budget drops to 1800 W with limits at 240 W and the GPUs drawing 240 W each (1920 W
    # averaged, above the new budget): lowering the limits is the answer, not a batch shed
    # whose ceiling would hold for as long as the budget does.
    ctrl = JointController(JointParams(initial_batch_limit=None))
    gpus = [gpu(i, power_w=240.0, limit_w=240.0) for i in range(8)]
    servers = [
        server(f"s{k}", (2 * k, 2 * k + 1), signals(running=200), batch_limit=256) for k in range(4)
    ]
    decision = ctrl.decide(obs(0.0, gpus, servers, 1800.0))
    assert all(b == 256 for b in decision.batch_limits.values())
    assert not any("every cap at its floor" in r for r in decision.reasons)


def _mix(prompt_per_generated: float) -> ServerSignals:
    base = signals(itl_s=0.05, running=120, requests_per_s=15.0)
    return dataclasses.replace(
        base,
        prompt_tokens_per_s=prompt_per_generated * base.generation_tokens_per_s,
    )


def test_a_shift_to_long_prompts_raises_the_cap_before_the_latency_shows_it():
    ctrl = JointController()

    def tick(t: float, sig: ServerSignals, limit_w: float) -> float:
        gpus = [gpu(i, power_w=limit_w - 5.0, limit_w=limit_w) for i in (0, 1)]
        decision = ctrl.decide(obs(t, gpus, [server("s0", (0, 1), sig)]))
        return max(decision.power_limits_w.values())

    limit, t = 300.0, 0.0
    # A chat mix (2 prompt tokens per generated token) at 300 W with 50% ITL headroom.
    ctrl.decide(obs(0.0, [gpu(i, 295.0, limit_w=300.0) for i in (0, 1)], []))
    for _ in range(40):
        t += 0.5
        limit = tick(t, _mix(2.0), limit)
    held = limit
    # Long prompts arrive: the window's prefill share climbs, latency still fine.
    for share in (2.5, 3.2, 4.0, 5.0):
        t += 0.5
        limit = tick(t, _mix(share), limit)
    assert limit > held + 50.0


def test_chat_noise_in_a_thin_window_is_not_a_shift_of_the_mix():
    ctrl = JointController()
    sig = dataclasses.replace(_mix(2.0), requests_per_s=3.0, running=15)
    noisy = dataclasses.replace(sig, prompt_tokens_per_s=sig.prompt_tokens_per_s * 1.5)
    limit = 300.0
    for k in range(60):
        s = noisy if k % 20 == 19 else sig
        gpus = [gpu(i, power_w=250.0, limit_w=limit) for i in (0, 1)]
        decision = ctrl.decide(obs(k * 0.5, gpus, [server("s0", (0, 1), s)]))
        assert not any("prefill share up" in r for r in decision.reasons)
        limit = max(decision.power_limits_w.values())


def test_a_server_starved_by_the_budget_opens_its_batch_limit_when_requests_wait():
    # 600 W for two GPUs that want more (ITL thin): the budget binds and the server is
    # starved; requests wait, so the batch limit opens fully rather than step by step.
    ctrl = JointController()
    sig = signals(itl_s=0.09, ttft_s=1.0, running=64, waiting=20)
    limits: dict[int, float] = {}
    decision = None
    for tick in range(12):
        gpus = [gpu(i, power_w=295.0, limit_w=limits.get(i, 300.0)) for i in (0, 1)]
        decision = ctrl.decide(obs(tick * 0.5, gpus, [server("s0", (0, 1), sig)], 600.0))
        limits.update(decision.power_limits_w)
    assert decision is not None and decision.mode == "budget-bound"
    assert decision.batch_limits["s0"] == 256


def test_a_chat_burst_is_a_load_step_not_a_shift_of_the_mix():
    # A burst of chat requests counts its prompts at prefill before their tokens are
    # generated, so the window's prefill share rises with it; but the concurrency (running +
    # waiting) rises first, which a shift to long prompts does not do: no prefill feed-forward
    # for a burst (issue 10's price gap: such false raises cost ~3% tokens/J there).
    ctrl = JointController()

    def tick(t: float, sig: ServerSignals, limit_w: float) -> tuple[float, list[str]]:
        gpus = [gpu(i, power_w=limit_w - 5.0, limit_w=limit_w) for i in (0, 1)]
        decision = ctrl.decide(obs(t, gpus, [server("s0", (0, 1), sig)]))
        return max(decision.power_limits_w.values()), list(decision.reasons)

    limit, t = 300.0, 0.0
    for _ in range(40):
        t += 0.5
        limit, _ = tick(t, _mix(2.0), limit)
    reasons: list[str] = []
    # The burst queues first (its prompts are not prefilled yet), then runs.
    burst = ((2.0, 120, 60), (2.5, 170, 30), (3.2, 180, 10), (4.0, 180, 0), (5.0, 180, 0))
    for share, running, waiting in burst:
        t += 0.5
        sig = dataclasses.replace(_mix(share), running=running, waiting=waiting)
        limit, said = tick(t, sig, limit)
        reasons += said
    assert not any("prefill share up" in r for r in reasons), reasons


def test_a_budget_equal_to_every_maximum_still_plans_a_guard_below_it():
    # Every server asks for its 700 W maximum and the budget is 8 x 700 W: GPUs at their
    # maximum overshoot it for a moment like any other limit, so the plan stays a guard below.
    ctrl = JointController()
    gpus = [gpu(i, power_w=690.0, limit_w=700.0) for i in range(8)]
    missing = signals(itl_s=0.2)
    servers = [server(f"s{k}", (2 * k, 2 * k + 1), missing) for k in range(4)]
    decision = ctrl.decide(obs(100.0, gpus, servers, 5600.0))
    guard = JointParams().budget_guard_frac * 5600.0
    assert sum(decision.power_limits_w.values()) <= 5600.0 - guard + 1e-6
    assert decision.mode == "budget-bound"


def test_a_budget_a_whole_guard_above_every_maximum_does_not_bind():
    ctrl = JointController()
    gpus = [gpu(i, power_w=690.0, limit_w=700.0) for i in range(8)]
    servers = [server(f"s{k}", (2 * k, 2 * k + 1), signals(itl_s=0.2)) for k in range(4)]
    decision = ctrl.decide(obs(100.0, gpus, servers, 6000.0))
    assert all(w == 700.0 for w in decision.power_limits_w.values())
    assert decision.mode != "budget-bound"
