"""The group split (palsd/core/allocation.py): tables for the rules, hypothesis for the promises."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.core.allocation import HostNeed, allocate, water_level

MW = 0.001  # allocations are whole milliwatts, rounded down


def host(name, floor=1600.0, demand=3000.0, max_w=5600.0, urgency=0.0):
    return HostNeed(name, floor, demand, max_w, urgency)


def test_every_host_gets_its_floor_then_its_demand_then_headroom():
    a = allocate(9000, [host("a", demand=2000), host("b", demand=4000)])
    assert a.feasible
    # floors 3200; demands above the floors 400 + 2400; the 3000 left spread evenly as headroom
    assert a.watts == {"a": 3500.0, "b": 5500.0}
    assert a.unmet_w == {"a": 0.0, "b": 0.0}


def test_binding_budget_fills_demand_evenly_above_floors():
    a = allocate(6000, [host("a", demand=5000), host("b", demand=5000)])
    assert a.watts == {"a": 3000.0, "b": 3000.0}
    assert a.unmet_w == {"a": 2000.0, "b": 2000.0}


def test_urgent_host_fills_faster():
    a = allocate(6000, [host("a", demand=5000, urgency=1.0), host("b", demand=5000)])
    # 2800 above the floors, weights 10 : 1
    assert a.watts["a"] == pytest.approx(1600 + 2800 * 10 / 11, abs=MW)
    assert a.watts["b"] == pytest.approx(1600 + 2800 / 11, abs=MW)


def test_idle_host_gives_its_power_to_the_busy_one():
    a = allocate(6000, [host("busy", demand=5000), host("idle", demand=1700)])
    assert a.watts["idle"] == 1700.0
    assert a.watts["busy"] == 4300.0


def test_infeasible_group_scales_the_floors():
    a = allocate(3000, [host("a"), host("b")])
    assert not a.feasible
    assert a.watts == {"a": 1500.0, "b": 1500.0}


def test_everyone_at_max_when_the_budget_is_loose():
    a = allocate(100000, [host("a"), host("b")])
    assert a.watts == {"a": 5600.0, "b": 5600.0}


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        HostNeed("a", 100, float("nan"), 200)
    with pytest.raises(ValueError):
        HostNeed("a", 300, 100, 200)  # max below floor
    with pytest.raises(ValueError):
        allocate(100, [host("a"), host("a")])
    with pytest.raises(ValueError):
        allocate(-1, [host("a")])


def test_water_level_exact():
    assert water_level([10, 10], [1, 1], 10) == [5, 5]
    assert water_level([2, 10], [1, 1], 10) == [2, 8]
    assert water_level([10, 10], [3, 1], 8) == [6, 2]
    assert water_level([1, 1], [1, 1], 5) == [1, 1]


# ---- properties ----

watts = st.floats(min_value=0, max_value=20000, allow_nan=False, allow_infinity=False)


@st.composite
def needs(draw, min_size=1):
    n = draw(st.integers(min_value=min_size, max_value=8))
    out = []
    for i in range(n):
        floor = draw(st.floats(min_value=0, max_value=3000))
        span = draw(st.floats(min_value=0, max_value=5000))
        demand = draw(st.floats(min_value=0, max_value=9000))
        urgency = draw(st.floats(min_value=0, max_value=1))
        out.append(HostNeed(f"h{i}", floor, demand, floor + span, urgency))
    return out


@settings(max_examples=400, deadline=None)
@given(budget=watts, hosts=needs())
def test_sum_never_exceeds_the_group_budget(budget, hosts):
    a = allocate(budget, hosts)
    assert math.fsum(a.watts.values()) <= budget
    assert all(w >= 0 for w in a.watts.values())


@settings(max_examples=400, deadline=None)
@given(budget=watts, hosts=needs())
def test_each_host_gets_its_floor_when_feasible(budget, hosts):
    a = allocate(budget, hosts)
    if math.fsum(h.floor_w for h in hosts) <= budget:
        assert a.feasible
        for h in hosts:
            assert a.watts[h.host_id] >= h.floor_w
            assert a.watts[h.host_id] <= h.max_w
    else:
        assert not a.feasible


@settings(max_examples=400, deadline=None)
@given(
    budget=watts,
    hosts=needs(),
    which=st.integers(min_value=0, max_value=7),
    more=st.floats(min_value=0, max_value=5000),
)
def test_more_demand_never_gets_less(budget, hosts, which, more):
    i = which % len(hosts)
    h = hosts[i]
    hungrier = list(hosts)
    hungrier[i] = HostNeed(h.host_id, h.floor_w, h.demand_w + more, h.max_w, h.urgency)
    before = allocate(budget, hosts).watts[h.host_id]
    after = allocate(budget, hungrier).watts[h.host_id]
    assert after >= before - MW  # to the milliwatt the result is rounded to


@settings(max_examples=400, deadline=None)
@given(
    budget=watts,
    hosts=needs(),
    which=st.integers(min_value=0, max_value=7),
    more=st.floats(min_value=0, max_value=1),
)
def test_more_urgency_never_gets_less(budget, hosts, which, more):
    i = which % len(hosts)
    h = hosts[i]
    urgent = list(hosts)
    urgent[i] = HostNeed(h.host_id, h.floor_w, h.demand_w, h.max_w, min(1.0, h.urgency + more))
    before = allocate(budget, hosts).watts[h.host_id]
    after = allocate(budget, urgent).watts[h.host_id]
    assert after >= before - MW


@settings(max_examples=200, deadline=None)
@given(budget=watts, hosts=needs(), data=st.data())
def test_deterministic_whatever_the_order(budget, hosts, data):
    shuffled = data.draw(st.permutations(hosts))
    assert allocate(budget, hosts) == allocate(budget, shuffled)
    assert allocate(budget, hosts) == allocate(budget, hosts)
