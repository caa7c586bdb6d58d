"""Budget arbitration: which host budget is in force, from which source, until when.

Rules of this file: the effective budget is the lowest *active* one. The configured default is
always active; a local override and a facility budget are active until they expire; the
configured fallback is active only while a facility feed is expected and has no live budget
(never received, or expired), so a silent feed falls back to a safe figure instead of to none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from palsd.core.types import BudgetInForce, BudgetSource


@dataclass(frozen=True)
class BudgetEntry:
    watts: float
    expires_at: float | None = None  # seconds on the caller's clock; None: no expiry
    reason: str = ""
    set_at: float = 0.0
    origin: str = ""  # e.g. the MQTT topic or "palsctl"; shown to operators
    seq: int | None = None  # the sender's sequence number, where it has one

    def active(self, now_s: float) -> bool:
        return self.expires_at is None or now_s < self.expires_at


@dataclass(frozen=True)
class BudgetBook:
    default_w: float | None = None
    fallback_w: float | None = None
    facility_expected: bool = False
    override: BudgetEntry | None = None
    # Facility budgets by origin (the host topic and each group topic, already scaled to this
    # host's share): every live one applies, so the lowest wins like any other source.
    facility: Mapping[str, BudgetEntry] = field(default_factory=dict)

    def with_override(self, entry: BudgetEntry | None) -> BudgetBook:
        return replace(self, override=entry)

    def with_facility(self, origin: str, entry: BudgetEntry | None) -> BudgetBook:
        updated = dict(self.facility)
        if entry is None:
            updated.pop(origin, None)
        else:
            updated[origin] = entry
        return replace(self, facility=updated)

    def facility_live(self, now_s: float) -> bool:
        return any(e.active(now_s) for e in self.facility.values())

    def candidates(self, now_s: float) -> list[tuple[BudgetSource, BudgetEntry]]:
        found: list[tuple[BudgetSource, BudgetEntry]] = []
        live = [e for e in self.facility.values() if e.active(now_s)]
        if live:
            found.extend((BudgetSource.FACILITY, e) for e in live)
        elif self.facility_expected and self.fallback_w is not None:
            why = "facility budget expired" if self.facility else "no facility budget"
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
            origin=entry.origin,
            seq=entry.seq,
        )

    def next_expiry(self, now_s: float) -> float | None:
        """The earliest future time at which the budget in force may change by itself."""
        times = [
            e.expires_at
            for e in (self.override, *self.facility.values())
            if e is not None and e.expires_at is not None and e.expires_at > now_s
        ]
        return min(times) if times else None
