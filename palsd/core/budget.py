"""Budget arbitration: which host budget is in force, from which source, until when.

Rules of this file: the effective budget is the lowest *active* one. The configured default is
always active; a local override and a facility budget are active until they expire; the
configured fallback is active only while a facility feed is expected and has no live budget
(never received, or expired), so a silent feed falls back to a safe figure instead of to none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from palsd.core.types import BudgetInForce, BudgetSource


@dataclass(frozen=True)
class BudgetEntry:
    watts: float
    expires_at: float | None = None  # seconds on the caller's clock; None: no expiry
    reason: str = ""
    set_at: float = 0.0

    def active(self, now_s: float) -> bool:
        return self.expires_at is None or now_s < self.expires_at


@dataclass(frozen=True)
class BudgetBook:
    default_w: float | None = None
    fallback_w: float | None = None
    facility_expected: bool = False
    override: BudgetEntry | None = None
    facility: BudgetEntry | None = None

    def with_override(self, entry: BudgetEntry | None) -> BudgetBook:
        return replace(self, override=entry)

    def with_facility(self, entry: BudgetEntry | None) -> BudgetBook:
        return replace(self, facility=entry)

    def facility_live(self, now_s: float) -> bool:
        return self.facility is not None and self.facility.active(now_s)

    def candidates(self, now_s: float) -> list[tuple[BudgetSource, BudgetEntry]]:
        found: list[tuple[BudgetSource, BudgetEntry]] = []
        if self.facility is not None and self.facility.active(now_s):
            found.append((BudgetSource.FACILITY, self.facility))
        elif self.facility_expected and self.fallback_w is not None:
            why = "facility budget expired" if self.facility is not None else "no facility budget"
            found.append((BudgetSource.FALLBACK, BudgetEntry(self.fallback_w, reason=why)))
        if self.override is not None and self.override.active(now_s):
            found.append((BudgetSource.OVERRIDE, self.override))
        if self.default_w is not None:
            found.append((BudgetSource.DEFAULT, BudgetEntry(self.default_w, reason="configured")))
        return found

    def in_force(self, now_s: float) -> BudgetInForce:
        found = self.candidates(now_s)
        if not found:
            return BudgetInForce(effective_w=None, source=BudgetSource.NONE, reason="no budget")
        # Lowest wins; on a tie the earlier (more specific) source is reported.
        source, entry = min(found, key=lambda item: item[1].watts)
        return BudgetInForce(
            effective_w=entry.watts,
            source=source,
            expires_at=entry.expires_at,
            reason=entry.reason,
        )

    def next_expiry(self, now_s: float) -> float | None:
        """The earliest future time at which the budget in force may change by itself."""
        times = [
            e.expires_at
            for e in (self.override, self.facility)
            if e is not None and e.expires_at is not None and e.expires_at > now_s
        ]
        return min(times) if times else None
