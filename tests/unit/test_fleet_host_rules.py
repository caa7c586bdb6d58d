"""Host rules of a coordinated group (palsd/core/budget.py FleetView), one table row each; and
the coordinator's report decoder, total on any JSON."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.core.budget import BudgetBook, BudgetEntry, FleetGroup, FleetRole
from palsd.core.types import BudgetSource
from palsd.fleet.host_status import fleet_section, server_urgency
from palsd.fleet.protocol import BadReport, decode_report

GROUP = FleetGroup("p/rack/budget", 0.25, ("c1", "c2"), hold_s=5.0)
ONE = FleetGroup("p/rack/budget", 0.25, ("c1",), hold_s=5.0)


def group_budget(book: BudgetBook, watts: float, at: float, g: FleetGroup = GROUP) -> BudgetBook:
    entry = BudgetEntry(watts * g.share, expires_at=at + 60, set_at=at, fleet=FleetRole(g))
    return book.with_facility(g.group_origin, entry)


def allocation(book, c, watts, at, ttl=10.0, seq=1, g: FleetGroup = GROUP) -> BudgetBook:
    origin = f"p/rack/alloc/{c}/h/budget"
    entry = BudgetEntry(
        watts, expires_at=at + ttl, set_at=at, origin=origin, seq=seq, fleet=FleetRole(g, c)
    )
    return book.with_facility(origin, entry)


def allowed(book: BudgetBook, now: float) -> float:
    return book.fleet[GROUP.group_origin].in_force(now).watts


def test_a_new_host_holds_its_floor_not_its_share():
    book = group_budget(BudgetBook(default_w=5000), 8000, at=0)
    assert allowed(book, 1) == 0.0
    budget = book.in_force(1)
    assert budget.effective_w == 0.0 and budget.source == BudgetSource.FACILITY
    assert "joining" in budget.reason


def test_an_allocation_while_young_counts_nothing_then_the_next_one_applies():
    book = group_budget(BudgetBook(), 8000, at=0, g=ONE)
    book = allocation(book, "c1", 3000, at=1, g=ONE)  # young: 1 s < hold_s after the budget
    assert book.fleet[ONE.group_origin].in_force(2).watts == 0.0
    book = allocation(book, "c1", 3000, at=6, seq=2, g=ONE)
    assert book.fleet[ONE.group_origin].in_force(7).watts == 3000.0


def test_the_lowest_valid_allocation_wins_and_a_silent_coordinator_caps_at_the_share():
    book = group_budget(BudgetBook(), 8000, at=0)
    book = allocation(book, "c1", 3000, at=6)
    assert allowed(book, 7) == 2000.0  # c2 not heard from: the fixed share (0.25 x 8000)
    book = allocation(book, "c2", 2500, at=7)
    book = allocation(book, "c1", 3000, at=7, seq=2)
    assert allowed(book, 8) == 2500.0  # both valid: the lower


def test_on_expiry_the_lower_of_last_allocation_and_share():
    book = group_budget(BudgetBook(), 8000, at=0, g=ONE)
    book = allocation(book, "c1", 3000, at=6, ttl=10, g=ONE)
    view = book.fleet[ONE.group_origin]
    assert view.in_force(15).watts == 3000.0
    assert view.in_force(16).watts == 2000.0  # expired: min(3000, 0.25 x 8000)
    book = allocation(book, "c1", 1200, at=20, ttl=10, seq=2, g=ONE)
    assert book.fleet[ONE.group_origin].in_force(31).watts == 1200.0  # min(1200, 2000)


def test_a_cut_scales_every_held_allocation_on_arrival():
    book = group_budget(BudgetBook(), 8000, at=0, g=ONE)
    book = allocation(book, "c1", 3000, at=6, ttl=60, g=ONE)
    book = group_budget(book, 4000, at=8, g=ONE)
    assert book.fleet[ONE.group_origin].in_force(8).watts == 1500.0
    # An allocation computed on the old budget that arrives just after the cut is scaled too.
    book = allocation(book, "c1", 3000, at=9, ttl=60, seq=2, g=ONE)
    assert book.fleet[ONE.group_origin].in_force(9).watts == 1500.0
    # One computed on the new budget, arriving after the hold window, is taken as sent.
    book = allocation(book, "c1", 1800, at=14, ttl=60, seq=3, g=ONE)
    assert book.fleet[ONE.group_origin].in_force(14).watts == 1800.0


def test_a_raise_then_a_cut_scales_by_the_highest_budget_while_held():
    book = group_budget(BudgetBook(), 4000, at=0, g=ONE)
    book = allocation(book, "c1", 3200, at=6, ttl=60, g=ONE)  # computed on 4000
    book = group_budget(book, 8000, at=10, g=ONE)
    book = group_budget(book, 4000, at=20, g=ONE)
    # Others may have been raised under 8000: this one is scaled as if computed on it.
    assert book.fleet[ONE.group_origin].in_force(21).watts == 1600.0


def test_next_expiry_includes_allocations():
    book = group_budget(BudgetBook(), 8000, at=0, g=ONE)
    book = allocation(book, "c1", 3000, at=6, ttl=10, g=ONE)
    assert book.next_expiry(7) == 16


def test_fleet_status_reports_what_the_coordinator_needs():
    book = group_budget(BudgetBook(), 8000, at=0, g=ONE)
    book = allocation(book, "c1", 3000, at=6, ttl=10, seq=42, g=ONE)
    status = {
        "gpus": [
            {"min_limit_w": 200, "max_limit_w": 700, "power_w": 690, "power_limit_w": 700},
            {"min_limit_w": 200, "max_limit_w": 700, "power_w": 100, "power_limit_w": 700},
        ],
        "servers": [{"slo_met": False}],
    }
    section = fleet_section(status, book.fleet_status(7))
    assert section["floor_w"] == 400 and section["max_w"] == 1400
    # a host missing its SLO asks for its whole range, whatever its GPUs press for
    assert section["urgency"] == 1.0 and section["demand_w"] == 1400
    relaxed = fleet_section({**status, "servers": [{"slo_met": True}]}, book.fleet_status(7))
    # the pressing GPU asks for its maximum; the relaxed one its draw + 30 W, at least its minimum
    assert relaxed["urgency"] == 0.0 and relaxed["demand_w"] == 700 + 200
    report = decode_report({"fleet": section}, "h", ONE.group_origin, "c1", now_s=7)
    assert report.held_seq == 42 and report.held_w == 3000 and not report.joining
    assert report.in_force_w == 3000


@pytest.mark.parametrize(
    ("server", "urgency"),
    [
        ({}, 0.0),
        ({"slo_met": True}, 0.0),
        ({"slo_met": False}, 1.0),
        ({"slo": {"ttft_s": 1.0}, "ttft_s": {"p90": 0.5}}, 0.0),
        ({"slo": {"ttft_s": 1.0}, "ttft_s": {"p90": 1.05}}, 0.5),
        ({"slo": {"ttft_s": 1.0}, "ttft_s": {"p90": 3.0}}, 1.0),
    ],
)
def test_server_urgency(server, urgency):
    assert server_urgency(server) == pytest.approx(urgency)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    doc=json_values,
    fleet=st.dictionaries(
        st.sampled_from(["floor_w", "max_w", "demand_w", "draw_w", "urgency", "groups"]),
        json_values,
    ),
)
def test_decode_report_is_total(doc, fleet):
    for candidate in (doc, {"fleet": fleet}, {"fleet": {**fleet, "groups": {"g": doc}}}):
        try:
            decode_report(candidate, "h", "g", "c1", 0.0)
        except BadReport as err:
            assert err.reason
