"""Safety rules as properties: the sum fits the budget, limits fit constraints, lower first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from palsd.core.safety import clamp_limit_w, fit_to_budget, limit_raise, order_writes
from palsd.core.types import GpuObservation
from tests.unit.gpus import h100

limits = st.floats(min_value=0, max_value=1000, allow_nan=False)


@st.composite
def fleets(draw) -> list[GpuObservation]:
    n = draw(st.integers(1, 8))
    out = []
    for i in range(n):
        lo = draw(st.floats(50, 300))
        hi = draw(st.floats(lo, 800))
        limit = draw(st.floats(lo, hi))
        out.append(GpuObservation(i, "g", f"u{i}", None, None, None, limit, None, lo, hi, hi))
    return out


@given(fleets(), st.lists(limits, min_size=8, max_size=8), st.floats(0, 8000))
def test_fit_to_budget_sum_within_budget_and_constraints(gpus, wants, budget):
    targets = {g.index: wants[g.index] for g in gpus}
    fitted = fit_to_budget(targets, gpus, budget)
    total = sum(fitted.limits_w.values())
    for g in gpus:
        assert g.min_limit_w - 1e-3 <= fitted.limits_w[g.index] <= g.max_limit_w
    if fitted.infeasible:
        assert sum(g.min_limit_w for g in gpus) > budget
    else:
        assert total <= budget + 1e-9


@given(fleets(), st.lists(limits, min_size=8, max_size=8), st.floats(0, 8000))
def test_lower_before_raise_keeps_every_prefix_within_budget(gpus, wants, budget):
    start = fit_to_budget({g.index: g.power_limit_w for g in gpus}, gpus, budget)
    end = fit_to_budget({g.index: wants[g.index] for g in gpus}, gpus, budget)
    if start.infeasible:
        return
    current = dict(start.limits_w)
    for index, watts in order_writes(current, end.limits_w):
        current[index] = watts
        assert sum(current.values()) <= budget + 1e-6


@given(
    fleets(),
    st.lists(limits, min_size=8, max_size=8),
    st.lists(st.floats(-0.6, 0.6), min_size=8, max_size=8),
    st.floats(0, 8000),
)
def test_skipping_small_lowerings_never_leaves_the_sum_above_the_budget(
    gpus, wants, jitter_w, budget
):
    start = fit_to_budget({g.index: g.power_limit_w for g in gpus}, gpus, budget)
    if start.infeasible:
        return
    # Targets near the current limits (the controller's fraction-of-a-watt moves) or far.
    near = {g.index: start.limits_w[g.index] + jitter_w[g.index] for g in gpus}
    far = {g.index: wants[g.index] for g in gpus}
    for wanted in (near, far):
        end = fit_to_budget(wanted, gpus, budget)
        current = dict(start.limits_w)
        for index, watts in order_writes(current, end.limits_w, budget_w=budget):
            current[index] = watts
            assert sum(current.values()) <= budget + 1e-6
        assert all(abs(current[i] - end.limits_w[i]) <= 0.5 + 1e-9 for i in current)


def test_a_small_lowering_is_skipped_only_while_the_budget_holds():
    assert order_writes({0: 433.3, 1: 300.0}, {0: 433.002, 1: 300.0}, budget_w=800) == []
    assert order_writes({0: 433.3, 1: 300.0}, {0: 433.002, 1: 300.0}, budget_w=733.1) == [
        (0, 433.002)
    ]


def test_order_writes_lowers_first_and_skips_unchanged():
    writes = order_writes({0: 700, 1: 300, 2: 500}, {0: 400, 1: 600, 2: 500.2})
    assert writes == [(0, 400), (1, 600)]


def test_order_writes_never_skips_a_small_lowering():
    assert order_writes({0: 433.3}, {0: 433.002}) == [(0, 433.002)]


def test_infeasible_budget_puts_every_gpu_at_minimum():
    gpus = [h100(0), h100(1)]
    fitted = fit_to_budget({0: 700, 1: 700}, gpus, 300)
    assert fitted.infeasible
    assert fitted.limits_w == {0: 200.0, 1: 200.0}


def test_clamp_and_slew_limit_only_delay_raises():
    g = h100(0)
    assert clamp_limit_w(900, g) == 700 and clamp_limit_w(10, g) == 200
    assert limit_raise({0: 300, 1: 600}, {0: 500, 1: 250}, 50) == {0: 350, 1: 250}
