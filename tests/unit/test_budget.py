"""Budget arbitration: lowest active budget wins; expiry; fallback only for a silent feed."""

from __future__ import annotations

import pytest

from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.types import BudgetSource


@pytest.mark.parametrize(
    ("book", "now", "expect_w", "expect_source"),
    [
        (BudgetBook(), 0.0, None, BudgetSource.NONE),
        (BudgetBook(default_w=2800), 0.0, 2800, BudgetSource.DEFAULT),
        (
            BudgetBook(default_w=2800).with_override(BudgetEntry(2000, expires_at=10)),
            5.0,
            2000,
            BudgetSource.OVERRIDE,
        ),
        (
            BudgetBook(default_w=2800).with_override(BudgetEntry(2000, expires_at=10)),
            10.0,
            2800,
            BudgetSource.DEFAULT,
        ),
        (
            BudgetBook(default_w=1500).with_override(BudgetEntry(2000)),
            0.0,
            1500,
            BudgetSource.DEFAULT,
        ),
        (BudgetBook(default_w=2800, fallback_w=2000), 0.0, 2800, BudgetSource.DEFAULT),
        (
            BudgetBook(default_w=2800, fallback_w=2000, facility_expected=True),
            0.0,
            2000,
            BudgetSource.FALLBACK,
        ),
        (
            BudgetBook(default_w=2800, fallback_w=2000, facility_expected=True).with_facility(
                "host", BudgetEntry(2400, expires_at=60)
            ),
            30.0,
            2400,
            BudgetSource.FACILITY,
        ),
        (
            BudgetBook(default_w=2800, fallback_w=2000, facility_expected=True).with_facility(
                "host", BudgetEntry(2400, expires_at=60)
            ),
            60.0,
            2000,
            BudgetSource.FALLBACK,
        ),
        (
            BudgetBook(facility_expected=True)
            .with_facility("host", BudgetEntry(2400))
            .with_facility("rack", BudgetEntry(1900, expires_at=5)),
            1.0,
            1900,
            BudgetSource.FACILITY,
        ),
    ],
)
def test_effective_budget_is_lowest_active(book, now, expect_w, expect_source):
    budget = book.in_force(now)
    assert budget.effective_w == expect_w
    assert budget.source == expect_source


def test_facility_entry_removed_by_origin():
    book = BudgetBook(facility_expected=True).with_facility("host", BudgetEntry(1000))
    book = book.with_facility("host", None)
    assert book.facility == {}
    assert book.in_force(0).source == BudgetSource.NONE


def test_next_expiry_is_earliest_future_expiry():
    book = (
        BudgetBook()
        .with_override(BudgetEntry(1000, expires_at=50))
        .with_facility("h", BudgetEntry(900, expires_at=20))
    )
    assert book.next_expiry(0) == 20
    assert book.next_expiry(25) == 50
    assert book.next_expiry(60) is None
