"""Hypothesis properties of the joint controller and the write order it is applied through."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.core.controller import JointController
from palsd.core.safety import order_writes, power_committed_w
from palsd.core.types import GpuObservation, Observation, ServerObservation
from tests.unit.test_controller_fixtures import gpu, obs, server, signals

latency = st.one_of(st.none(), st.floats(0.001, 10.0))


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    n_servers = draw(st.integers(1, 4))
    tp = draw(st.sampled_from([1, 2]))
    gpus: list[GpuObservation] = []
    servers: list[ServerObservation] = []
    for s in range(n_servers):
        indices = tuple(range(s * tp, (s + 1) * tp))
        for i in indices:
            min_w = draw(st.sampled_from([100.0, 150.0, 200.0]))
            max_w = draw(st.sampled_from([400.0, 700.0]))
            power = draw(st.one_of(st.none(), st.floats(50.0, 750.0)))
            limit = draw(st.floats(min_w, max_w))
            gpus.append(gpu(i, power_w=power, limit_w=limit, min_w=min_w, max_w=max_w))
        sig = draw(
            st.one_of(
                st.none(),
                st.builds(
                    signals,
                    itl_s=latency,
                    ttft_s=latency,
                    running=st.floats(0, 512),
                    waiting=st.floats(0, 512),
                    requests_per_s=st.floats(0, 100),
                ),
            )
        )
        max_seqs = draw(st.integers(1, 512))
        batch = draw(st.one_of(st.none(), st.integers(1, max_seqs)))
        servers.append(server(f"s{s}", indices, sig, batch_limit=batch, max_num_seqs=max_seqs))
    budget = draw(st.one_of(st.none(), st.floats(0.0, 8 * 700.0)))
    return obs(draw(st.floats(0.0, 1e5)), gpus, servers, budget)


def check(obs_: Observation, ctrl: JointController) -> None:
    decision = ctrl.decide(obs_)
    budget = obs_.budget.effective_w
    limits = decision.power_limits_w
    assert set(limits) == {g.index for g in obs_.gpus}
    sum_min = sum(g.min_limit_w for g in obs_.gpus)
    for g in obs_.gpus:
        assert g.min_limit_w <= limits[g.index] <= g.max_limit_w
    if budget is not None and sum_min <= budget:
        assert not decision.infeasible
        assert sum(limits.values()) <= budget + 1e-9
        # A raise only ever takes power that is free: lowered GPUs count at what they draw.
        if any(limits[g.index] > g.power_limit_w for g in obs_.gpus):
            assert power_committed_w(limits, obs_.gpus) <= budget + 1e-6
    if budget is not None and sum_min > budget:
        assert decision.infeasible and decision.mode == "infeasible"
        assert all(limits[g.index] == g.min_limit_w for g in obs_.gpus)
    for srv in obs_.servers:
        if srv.batch_limit is None or not srv.batch_controllable:
            # cap only: batch control unavailable, so no batch limit is asked for
            assert srv.name not in decision.batch_limits
        else:
            assert 1 <= decision.batch_limits[srv.name] <= (srv.max_num_seqs or 10**9)
    assert decision.reasons and decision.mode


@settings(max_examples=300, deadline=None)
@given(observations())
def test_one_decision_keeps_every_hard_rule(o: Observation) -> None:
    check(o, JointController())


@settings(max_examples=60, deadline=None)
@given(st.lists(observations(), min_size=2, max_size=12))
def test_a_sequence_of_decisions_keeps_every_hard_rule(seq: list[Observation]) -> None:
    # State carried from earlier, unrelated ticks must never leak past the rules.
    ctrl = JointController()
    for i, o in enumerate(seq):
        check(Observation(i * 0.5, o.gpus, o.servers, o.budget), ctrl)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(100, 700), st.floats(100, 700)), min_size=1, max_size=8),
    st.floats(800, 5600),
)
def test_every_prefix_of_ordered_writes_stays_within_budget(
    pairs: list[tuple[float, float]], budget_w: float
) -> None:
    current = {i: a for i, (a, _) in enumerate(pairs)}
    target = {i: b for i, (_, b) in enumerate(pairs)}
    if sum(current.values()) > budget_w or sum(target.values()) > budget_w:
        return  # the property is about moves between two safe states
    applied = dict(current)
    for index, watts in order_writes(current, target):
        applied[index] = watts
        assert sum(applied.values()) <= budget_w + 1e-6
    for i, watts in target.items():
        assert abs(applied[i] - watts) <= 0.5
