"""Where budgets arrive (MQTT feed, local API, reload) and how a change is handed to the daemon.

Rules of this file: the book is replaced, never edited. A change of the budget in force bumps
`seq`, so a tick that started before it may not raise a limit. A change that leaves the limits
in force above the new budget is a cut: `cut` is set and the daemon's budget task enforces the
newest budget once, however many changes arrived meanwhile (`take_cut` says since when the
oldest of them waited). Any other change sets `more_room`, letting the next tick start early.
Once `closing` is set nothing is handed on: the daemon is restoring. An expiry is handed on
like an arrival, at its time, by `wait_cut` (the budget task's wait): no message announces it,
and a tick cannot always meet it (its GPU read may fail). A raise asks `may_raise`, which also
reads the budget in force, for the expiry that falls inside a write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.types import BudgetInForce
from palsd.report.metrics import Metrics


class BudgetDesk:
    def __init__(
        self,
        book: BudgetBook,
        metrics: Metrics,
        clock: Callable[[], float],
        limit_sum_w: Callable[[], float | None],
    ) -> None:
        self.book, self._metrics, self._clock, self._limit_sum_w = book, metrics, clock, limit_sum_w
        self.seq = 0
        self.cut = asyncio.Event()
        self.more_room = asyncio.Event()
        self.closing = False
        self._price: tuple[float, float | None] | None = None  # (per MWh, expires_at)
        self._cut_since: float | None = None
        self._known_w = self.in_force().effective_w  # the budget in force as last handed on
        self._wake = asyncio.Event()  # a change or a cut: `wait_cut` looks again

    def in_force(self) -> BudgetInForce:
        return self.book.in_force(self._clock())

    def next_expiry(self) -> float | None:
        return self.book.next_expiry(self._clock())

    @property
    def price_per_mwh(self) -> float | None:
        """The electricity price in force: None before the first and once the last one has
        expired (a stale price is no price, like a budget past its expiry)."""
        if self._price is None:
            return None
        price, expires_at = self._price
        return price if expires_at is None or self._clock() < expires_at else None

    def may_raise(self, seq: int, planned_w: float | None) -> bool:
        """Whether a raise planned under `planned_w` at `seq` may still go out: no budget has
        arrived since, and none has expired into a lower one (an expiry is a cut that no
        message announces). Asked before each raise, from the writing thread."""
        if self.seq != seq:
            return False
        now_w = self.in_force().effective_w
        return now_w is None or (planned_w is not None and now_w >= planned_w)

    # ---- the entry points (on the event loop) ----

    def set_override(self, entry: BudgetEntry | None) -> BudgetInForce:
        self._change(self.book.with_override(entry))
        return self.in_force()

    def facility_budget(self, origin: str, entry: BudgetEntry | None) -> None:
        self._change(self.book.with_facility(origin, entry))

    def price(self, price_per_mwh: float, expires_at: float | None) -> None:
        self._price = (price_per_mwh, expires_at)

    def replace_config(self, default_w: float | None, fallback_w: float | None) -> None:
        self._change(replace(self.book, default_w=default_w, fallback_w=fallback_w))

    def _change(self, book: BudgetBook) -> None:
        self.book = book
        self._hand_on()
        self._wake.set()  # the next expiry may be another one now

    def _hand_on(self) -> None:
        budget = self.in_force()
        if budget.effective_w != self._known_w:
            self.seq += 1
            self._known_w = budget.effective_w
        self._metrics.report_budget(budget)
        if self.closing:
            return
        if not self.recheck():
            self.more_room.set()  # a cut is enforced by itself: an early tick would compete

    async def wait_cut(self) -> None:
        """Return once a cut is signalled; meanwhile hand each expiry on at its time, as if
        the budget that takes over (the fallback, or the next lowest) had arrived then."""
        while not self.cut.is_set():
            self._wake.clear()
            expiry = self.next_expiry()
            timeout = None if expiry is None else max(0.0, expiry - self._clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self.in_force().effective_w != self._known_w:
                    self._hand_on()

    def recheck(self) -> bool:
        """Signal a cut if the limits in force sum above the budget in force. Called when a
        budget arrives and after every write: a raise whose set call was in flight when a
        budget arrived lands over it, and only the write path sees that happen."""
        budget = self.in_force()
        limits_w = self._limit_sum_w()
        if self.closing or budget.effective_w is None or limits_w is None:
            return False
        if limits_w <= budget.effective_w:
            return False
        if self._cut_since is None:
            self._cut_since = time.perf_counter()
        self.cut.set()
        self._wake.set()
        return True

    def take_cut(self) -> float | None:
        """The daemon enforces now: clear the cut, answer when the oldest waiting one came."""
        self.cut.clear()
        since, self._cut_since = self._cut_since, None
        return since
