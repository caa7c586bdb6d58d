"""Budget arbitration: which host budget is in force, from which source, until when.

Rules of this file: the effective budget is the lowest *active* one. The configured default is
always active; a local override and a facility budget are active until they expire; the
configured fallback is active only while a facility feed is expected and has no live budget
(never received, or expired), so a silent feed falls back to a safe figure instead of to none.

A group moved by a fleet coordinator (docs/fleet.md) is one more candidate, ruled by
`FleetView`: the lowest valid allocation of the group's coordinators, scaled down at once when
the group budget is cut; on expiry the lower of the last allocation and the fixed share; a host
that has heard from no coordinator yet holds nothing above its floor (0 W).
"""

from __future__ import annotations

import math
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
    # Set by the feed on the budget topic of a coordinated group and on each of its
    # coordinators' allocation topics: the entry then feeds that group's FleetView.
    fleet: FleetRole | None = None

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
    # Coordinated groups by the group budget topic: each always yields one candidate.
    fleet: Mapping[str, FleetView] = field(default_factory=dict)

    def with_override(self, entry: BudgetEntry | None) -> BudgetBook:
        return replace(self, override=entry)

    def with_facility(self, origin: str, entry: BudgetEntry | None) -> BudgetBook:
        if entry is not None and entry.fleet is not None:
            role = entry.fleet
            views = dict(self.fleet)
            view = views.get(role.group_origin) or FleetView(role.group)
            views[role.group_origin] = view.with_entry(role, entry)
            return replace(self, fleet=views)
        updated = dict(self.facility)
        if entry is None:
            updated.pop(origin, None)
        else:
            updated[origin] = entry
        return replace(self, facility=updated)

    def facility_live(self, now_s: float) -> bool:
        return bool(self.fleet) or any(e.active(now_s) for e in self.facility.values())

    def candidates(self, now_s: float) -> list[tuple[BudgetSource, BudgetEntry]]:
        found: list[tuple[BudgetSource, BudgetEntry]] = []
        live = [e for e in self.facility.values() if e.active(now_s)]
        # A coordinated group always has a value (allocation, fallback or join): it is live.
        live.extend(view.in_force(now_s) for view in self.fleet.values())
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
        times.extend(t for v in self.fleet.values() for t in v.expiries() if t > now_s)
        return min(times) if times else None

    def fleet_status(self, now_s: float) -> dict[str, dict[str, object]]:
        """What a coordinator needs to know of each coordinated group (published in status)."""
        return {origin: view.status(now_s) for origin, view in sorted(self.fleet.items())}


# ---- coordinated groups (host side) ----


@dataclass(frozen=True)
class FleetGroup:
    """This host's configuration of one coordinated group (the same on every message)."""

    group_origin: str  # the facility's group budget topic
    share: float  # the fixed share: what the host may fall back to, at most
    coordinators: tuple[str, ...]  # coordinator ids whose allocations this host takes
    hold_s: float = 10.0  # how long a group budget is remembered as an allocation's basis


@dataclass(frozen=True)
class FleetRole:
    """What an entry is to its group: the group budget (coordinator None) or an allocation."""

    group: FleetGroup
    coordinator: str | None = None

    @property
    def group_origin(self) -> str:
        return self.group.group_origin


@dataclass(frozen=True)
class HeldAllocation:
    watts: float  # as sent
    expires_at: float
    seq: int | None
    arrived_s: float
    basis_w: float  # the highest group budget seen from hold_s before arrival until now (inf:
    # unknown, the allocation counts as 0 W)
    origin: str = ""


@dataclass(frozen=True)
class FleetView:
    """One coordinated group as this host sees it. Rules (docs/fleet.md, "Host rules"):

    1. Join: until an allocation from any coordinator has arrived, the group allows 0 W (the
       host holds its floor): a new host cannot take its share while others may hold more.
    2. Each coordinator c gives a value V_c: its allocation while valid; once expired, the lower
       of that last allocation and the fixed share of the group budget; a configured
       coordinator not heard from yet gives the fixed share. The group allows min over c of V_c
       (two coordinators: the lowest valid allocation wins).
    3. Cut at once: an allocation is scaled by min(1, G_now / basis), basis being the highest
       group budget this host saw from `hold_s` before the allocation arrived until now, so a cut
       lowers every host on arrival, before any coordinator reacts, and an allocation computed
       on the old budget that arrives after the cut is scaled too.
    4. A view that has known the group budget for less than `hold_s` (the host just started)
       cannot tell which budget an allocation was computed on: such an allocation counts as
       0 W until the coordinator's next one replaces it.
    """

    group: FleetGroup
    group_w: float | None = None  # the last group budget seen (whole group), kept past expiry
    first_group_at: float | None = None  # arrival of the first group budget in this view
    recent: tuple[tuple[float, float], ...] = ()  # (arrival s, group W) in the hold window
    held: Mapping[str, HeldAllocation] = field(default_factory=dict)  # coordinator -> latest

    def with_entry(self, role: FleetRole, entry: BudgetEntry) -> FleetView:
        now = entry.set_at
        if role.coordinator is None:
            group_w = entry.watts / self.group.share  # the feed scaled it by the share
            keep = _window(self.recent, now - self.group.hold_s)
            first = now if self.first_group_at is None else self.first_group_at
            # An allocation's basis is the highest group budget seen while it is held.
            held = {c: replace(h, basis_w=max(h.basis_w, group_w)) for c, h in self.held.items()}
            return replace(
                self,
                group_w=group_w,
                recent=(*keep, (now, group_w)),
                first_group_at=first,
                held=held,
            )
        if role.coordinator not in self.group.coordinators:
            return self
        basis = self.basis_at(now)
        held = dict(self.held)
        held[role.coordinator] = HeldAllocation(
            watts=entry.watts,
            expires_at=float("inf") if entry.expires_at is None else entry.expires_at,
            seq=entry.seq,
            arrived_s=now,
            basis_w=basis,
            origin=entry.origin,
        )
        return replace(self, held=held)

    def basis_at(self, now_s: float) -> float:
        if self.first_group_at is None or now_s - self.first_group_at < self.group.hold_s:
            return math.inf  # too young to know what an allocation was computed on
        seen = [w for _, w in _window(self.recent, now_s - self.group.hold_s)]
        return max(seen) if seen else math.inf

    def share_w(self) -> float | None:
        return None if self.group_w is None else self.group.share * self.group_w

    def scaled_w(self, held: HeldAllocation) -> float:
        if self.group_w is None or math.isinf(held.basis_w):
            return 0.0
        if held.basis_w <= 0:
            return 0.0
        return held.watts * min(1.0, self.group_w / held.basis_w)

    def value_of(self, coordinator: str, now_s: float) -> tuple[float | None, str]:
        held = self.held.get(coordinator)
        share = self.share_w()
        if held is None:
            return share, f"fixed share ({coordinator} not heard from)"
        scaled = self.scaled_w(held)
        if now_s < held.expires_at:
            return scaled, f"allocation from {coordinator}"
        if share is not None and share < scaled:
            return share, f"fixed share ({coordinator}'s allocation expired)"
        return scaled, f"last allocation from {coordinator} (expired)"

    def in_force(self, now_s: float) -> BudgetEntry:
        if not self.held:
            return BudgetEntry(
                0.0,
                reason="fleet: joining; holds its floor until a coordinator allocates",
                origin=self.group.group_origin,
            )
        best: tuple[float, str, str, int | None] | None = None
        for c in self.group.coordinators:
            watts, why = self.value_of(c, now_s)
            if watts is None:
                continue
            held = self.held.get(c)
            origin = held.origin if held is not None else self.group.group_origin
            seq = held.seq if held is not None else None
            if best is None or watts < best[0]:
                best = (watts, why, origin, seq)
        assert best is not None  # some coordinator is held, and its value is never None
        watts, why, origin, seq = best
        return BudgetEntry(watts, reason=f"fleet: {why}", origin=origin, seq=seq)

    def expiries(self) -> list[float]:
        return [h.expires_at for h in self.held.values() if math.isfinite(h.expires_at)]

    def status(self, now_s: float) -> dict[str, object]:
        entry = self.in_force(now_s)
        return {
            "in_force_w": round(entry.watts, 3),
            "reason": entry.reason,
            "joining": not self.held,
            "group_budget_w": self.group_w,
            "share": self.group.share,
            "held": {
                c: {
                    "seq": h.seq,
                    "watts": h.watts,
                    "expires_at": h.expires_at if math.isfinite(h.expires_at) else None,
                    "valid": now_s < h.expires_at,
                }
                for c, h in sorted(self.held.items())
            },
        }


def _window(
    recent: tuple[tuple[float, float], ...], start_s: float
) -> tuple[tuple[float, float], ...]:
    """The entries after `start_s`, plus the last one before it (still in force at the start)."""
    i = 0
    while i + 1 < len(recent) and recent[i + 1][0] <= start_s:
        i += 1
    return recent[i:]
