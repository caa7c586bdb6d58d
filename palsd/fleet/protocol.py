"""The coordinator's side of the fleet protocol: a state machine with no I/O and no clock.

Rules of this file (the safety argument is in docs/fleet.md; these are its coordinator half):
1. The ledger keeps, per member host, an upper bound `may_hold_w` on the value this
   coordinator's allocations may give that host now or later, whatever was lost or delayed:
   - what the host last reported holding from this coordinator (allocation seq and watts; an
     expired allocation falls back to at most itself);
   - every allocation sent since with a higher seq (the host may get any of them), and the
     latest one sent while unexpired (a restarted host may get it again, retained);
   - the fixed share of the group budget while the host reports no allocation of ours (it
     may hold its share from a fallback or another coordinator) or never reported; a host
     that reports joining holds 0 W, but its floor is reserved (its GPUs sit at their minimums);
   - infinity for a host whose allocation may come from this coordinator's previous life,
     until one allocation lifetime after the start (those have all expired by then).
2. Lowering is always allowed: an allocation at or under `may_hold_w` cannot raise the bound.
3. Raising is allowed only while the bounds of all members, with the raise, sum to at most the
   group budget. So a host is raised only after the hosts lowered to pay for it report that
   they hold their lower allocation, and nothing is raised while a cut is being absorbed.
4. Every round sends the target to every host at or under its bound at once (a cut reaches
   everyone in one round) and refreshes allocations before they expire.
The caller pushes group budgets and host reports in, and pulls `Send`s out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from palsd.core.allocation import Allocation, HostNeed, allocate

MAX_SEQ = 2**53 - 1
_EPS_W = 0.001


class BadReport(ValueError):
    """A host's status has no usable fleet section; `reason` labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class HostReport:
    """The fleet part of one host's retained status, as this coordinator reads it."""

    host_id: str
    received_s: float  # coordinator clock
    floor_w: float
    max_w: float
    demand_w: float
    draw_w: float
    urgency: float
    in_force_w: float  # what the group allows this host now
    joining: bool
    held_seq: int | None  # this coordinator's allocation the host holds (None: none)
    held_w: float | None

    def need(self) -> HostNeed:
        return HostNeed(self.host_id, self.floor_w, self.demand_w, self.max_w, self.urgency)


def _num(obj: Mapping[str, Any], key: str, lo: float = 0.0, hi: float = 1e7) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadReport("wrong_type", f"{key} must be a number, got {type(value).__name__}")
    as_float = float(value)
    if not (math.isfinite(as_float) and lo <= as_float <= hi):
        raise BadReport("out_of_range", f"{key} {value!r} is not in [{lo}, {hi}]")
    return as_float


def decode_report(
    status: Any, host_id: str, group_origin: str, coordinator: str, now_s: float
) -> HostReport:
    """A host's status JSON (already parsed) to a HostReport. Total: anything else raises
    BadReport, nothing else."""
    if not isinstance(status, dict):
        raise BadReport("not_an_object", "status is not a JSON object")
    fleet = status.get("fleet")
    if not isinstance(fleet, dict):
        raise BadReport("no_fleet_section", "status has no 'fleet' object (palsd too old?)")
    groups = fleet.get("groups")
    if not isinstance(groups, dict):
        raise BadReport("wrong_type", "fleet.groups must be an object")
    group = groups.get(group_origin)
    if not isinstance(group, dict):
        raise BadReport("not_a_member", f"the host does not take {group_origin} as coordinated")
    held_all = group.get("held")
    if not isinstance(held_all, dict):
        raise BadReport("wrong_type", "fleet.groups[].held must be an object")
    mine = held_all.get(coordinator)
    held_seq: int | None = None
    held_w: float | None = None
    if mine is not None:
        if not isinstance(mine, dict):
            raise BadReport("wrong_type", "a held allocation must be an object")
        seq = mine.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise BadReport("wrong_type", "held seq must be an integer")
        held_seq, held_w = seq, _num(mine, "watts")
    joining = group.get("joining")
    if not isinstance(joining, bool):
        raise BadReport("wrong_type", "joining must be true or false")
    floor_w = _num(fleet, "floor_w")
    max_w = _num(fleet, "max_w")
    if max_w < floor_w:
        raise BadReport("out_of_range", f"max_w {max_w} < floor_w {floor_w}")
    return HostReport(
        host_id=host_id,
        received_s=now_s,
        floor_w=floor_w,
        max_w=max_w,
        demand_w=_num(fleet, "demand_w"),
        draw_w=_num(fleet, "draw_w"),
        urgency=_num(fleet, "urgency", 0.0, 1.0),
        in_force_w=_num(group, "in_force_w"),
        joining=joining,
        held_seq=held_seq,
        held_w=held_w,
    )


@dataclass(frozen=True)
class Send:
    """An allocation to publish on the host's allocation topic."""

    host_id: str
    watts: float
    seq: int
    issued_at: float
    expires_at: float
    group_budget_w: float  # what it was computed on (in the reason, for people)


@dataclass
class _Entry:
    """An allocation as the ledger keeps it; `basis_w` mirrors the host's rule 3: the highest
    group budget seen since it was sent, so the ledger scales it down on a cut like the host."""

    seq: int
    watts: float
    expires_at: float
    basis_w: float

    def scaled_w(self, group_w: float) -> float:
        return self.watts * min(1.0, group_w / self.basis_w) if self.basis_w > 0 else 0.0


@dataclass
class _Member:
    host_id: str
    share: float
    report: HostReport | None = None
    pending: list[_Entry] = field(default_factory=list)  # sent, newer than the reported seq
    acked: _Entry | None = None  # the one the host reports holding (this life)
    latest: _Entry | None = None  # the last sent (retained on the broker)
    latest_at: float = -math.inf
    last_seq: int = 0


@dataclass(frozen=True)
class Params:
    ttl_s: float = 15.0  # allocation lifetime
    refresh_s: float = 3.0  # re-send an unchanged allocation after this long
    stale_after_s: float = 15.0  # a member whose status is older is reported stale
    min_change_w: float = 1.0  # smaller changes are not worth a message (refreshes carry them)
    peers: bool = False  # another coordinator allocates the same group (a standby)
    # The hosts' hold_s (at least): an allocation that arrived within it after a cut was
    # scaled down by the host (rule 3); one sent after it is taken as sent, so re-send then.
    host_hold_s: float = 5.0


@dataclass(frozen=True)
class Round:
    sends: tuple[Send, ...]
    allocation: Allocation | None
    may_hold_w: Mapping[str, float]  # the ledger after the sends
    raise_blocked: tuple[str, ...]  # hosts whose raise waits for others to come down
    stale: tuple[str, ...]


class Coordinator:
    """The state machine of one coordinator for one group (rules above)."""

    def __init__(
        self,
        coordinator_id: str,
        members: Mapping[str, float],  # host id -> fixed share
        started_s: float,
        params: Params | None = None,
        last_seqs: Mapping[str, int] | None = None,
    ) -> None:
        self.coordinator_id = coordinator_id
        self.params = params or Params()
        self.started_s = started_s
        self.group_w: float | None = None
        self.members = {h: _Member(h, share) for h, share in sorted(members.items())}
        seqs = dict(last_seqs or {})
        for h, seq in seqs.items():
            if h in self.members:
                self.members[h].last_seq = seq
        # Sequence numbers of this life start above the clock in ms and above every seq a
        # previous life is known to have used, as the hosts' replay check needs.
        self.first_seq = max(int(started_s * 1000), 1 + max(seqs.values(), default=0))

    # ---- inputs ----

    def on_group_budget(self, watts: float) -> None:
        self.group_w = watts
        for m in self.members.values():
            for e in (*m.pending, m.acked, m.latest):
                if e is not None:
                    e.basis_w = max(e.basis_w, watts)

    def on_own_allocation(self, host_id: str, seq: int) -> None:
        """An allocation of ours seen on the broker (retained from a previous life): later
        sequence numbers must be higher."""
        m = self.members.get(host_id)
        if m is not None:
            m.last_seq = max(m.last_seq, seq)

    def on_report(self, report: HostReport) -> None:
        m = self.members.get(report.host_id)
        if m is None:
            return
        m.report = report
        seq = report.held_seq
        if seq is None:
            m.acked = None
            return
        for e in (*m.pending, m.latest):
            if e is not None and e.seq == seq:
                m.acked = e
        if m.acked is not None and m.acked.seq != seq:
            m.acked = None
        m.pending = [e for e in m.pending if e.seq > seq]

    # ---- the ledger ----

    def warming_up(self, now_s: float) -> bool:
        return now_s < self.started_s + self.params.ttl_s

    def _bound(self, m: _Member, now_s: float) -> tuple[float, float]:
        """(may_hold_w, the part of it our own allocations account for)."""
        g = self.group_w or 0.0
        share_w = m.share * g
        r = m.report
        this_life = r is not None and r.held_seq is not None and r.held_seq >= self.first_seq
        if not this_life and self.warming_up(now_s):
            return math.inf, math.inf  # a previous life's allocation may still arrive
        own = 0.0
        for e in m.pending:
            v = e.scaled_w(g)
            own = max(own, v if now_s < e.expires_at else min(v, share_w))
        if m.latest is not None and now_s < m.latest.expires_at:
            own = max(own, m.latest.scaled_w(g))
        if this_life and m.acked is not None:
            own = max(own, m.acked.scaled_w(g))
            return own, own
        if r is None:
            return max(own, share_w), own  # never reported: whatever its share allows
        if r.held_seq is not None:
            # A previous life's allocation: past the warm-up all of those have expired, so the
            # host holds its fallback, the lower of one of them and its share: at most share.
            return max(own, share_w), own
        if r.joining and not self.params.peers:
            # Holds 0 W until one of our allocations arrives, but its GPUs sit at their
            # minimum limits: reserve its floor, so the limits themselves stay in the budget.
            return max(own, r.floor_w), own
        return max(own, share_w), own  # may hold its share (a peer's allocation, a fallback)

    def may_hold_w(self, host_id: str, now_s: float) -> float:
        return self._bound(self.members[host_id], now_s)[0]

    def ledger(self, now_s: float) -> dict[str, float]:
        return {h: self.may_hold_w(h, now_s) for h in self.members}

    def stale(self, now_s: float) -> list[str]:
        return [
            h
            for h, m in self.members.items()
            if m.report is None or now_s - m.report.received_s > self.params.stale_after_s
        ]

    # ---- one round ----

    def plan(self, now_s: float) -> Round:
        stale = tuple(self.stale(now_s))
        bounds = self.ledger(now_s)
        if self.group_w is None or self.warming_up(now_s):
            return Round((), None, bounds, (), stale)
        g = self.group_w
        reporting = [m for m in self.members.values() if m.report is not None]
        # Members that never reported keep what they may hold out of the split.
        reserved = math.fsum(bounds[m.host_id] for m in self.members.values() if m.report is None)
        needs = []
        for m in reporting:
            assert m.report is not None
            need = m.report.need()
            if m.host_id in stale:  # silent: keep it at its floor until it speaks again
                need = HostNeed(need.host_id, need.floor_w, need.floor_w, need.max_w, 0.0)
            needs.append(need)
        allocation = allocate(max(0.0, g - reserved), needs)
        sends: list[Send] = []
        blocked: list[str] = []
        total = math.fsum(bounds.values())
        over = total > g
        raises: dict[str, float] = {}
        for h, target in sorted(allocation.watts.items()):
            bound, own = self._bound(self.members[h], now_s)
            # While over-committed only what our own allocations account for is known to be
            # held: a lower value there cannot raise the host; anything else must wait.
            limit = own if over else bound
            if target <= limit + _EPS_W:
                # A lowering (or the same value) goes out at once: cut first, everywhere.
                lower = target < limit - max(_EPS_W, self.params.min_change_w)
                force = lower or self._scaled_down(self.members[h], now_s)
                send = self._maybe_send(h, min(target, limit), now_s, force=force)
                if send is not None:
                    sends.append(send)
            else:
                raises[h] = target
        # Raises, most unmet first: only into what the ledger says is free.
        for h in sorted(raises, key=lambda k: (-(raises[k] - bounds[k]), k)):
            room = g - (total - bounds[h])
            give = min(raises[h], room)
            m = self.members[h]
            if give >= bounds[h] + self.params.min_change_w:
                send = self._maybe_send(h, give, now_s, force=True)
                if send is not None:
                    sends.append(send)
                new_bound = self._bound(m, now_s)[0]
                total += new_bound - bounds[h]
                bounds[h] = new_bound
                if give < raises[h] - _EPS_W:
                    blocked.append(h)
                continue
            blocked.append(h)
            own = self._bound(m, now_s)[1]
            if m.latest is not None and own > 0:
                # Keep what it holds alive; never more than our own allocations account for.
                send = self._maybe_send(h, min(own, m.latest.watts), now_s, force=False)
                if send is not None:
                    sends.append(send)
        return Round(tuple(sends), allocation, bounds, tuple(blocked), stale)

    def _scaled_down(self, m: _Member, now_s: float) -> bool:
        """The host holds our latest allocation but counts it lower than we do: it arrived
        too soon after a cut (host rule 3). Once the host's window has passed, re-send."""
        r, last = m.report, m.latest
        if r is None or last is None or r.held_seq != last.seq or self.group_w is None:
            return False
        if now_s - m.latest_at < self.params.host_hold_s:
            return False
        return r.in_force_w < last.scaled_w(self.group_w) - self.params.min_change_w

    def _maybe_send(self, host_id: str, watts: float, now_s: float, force: bool) -> Send | None:
        m = self.members[host_id]
        watts = math.floor(max(0.0, watts) * 1000) / 1000
        last = m.latest
        if (
            not force
            and last is not None
            and abs(last.watts - watts) < _EPS_W
            and now_s - m.latest_at < self.params.refresh_s
        ):
            return None
        assert self.group_w is not None
        seq = max(m.last_seq + 1, self.first_seq, int(now_s * 1000))
        entry = _Entry(seq, watts, now_s + self.params.ttl_s, self.group_w)
        m.last_seq = seq
        m.latest, m.latest_at = entry, now_s
        m.pending.append(entry)
        return Send(host_id, watts, seq, now_s, entry.expires_at, self.group_w)

    def status(self, now_s: float, last: Round | None) -> dict[str, Any]:
        """The coordinator's own status (its status topic, `palsctl fleet status`)."""
        bounds = self.ledger(now_s)
        alloc = last.allocation if last is not None else None
        hosts = {}
        for h, m in self.members.items():
            r = m.report
            hosts[h] = {
                "share": m.share,
                "allocated_w": None if m.latest is None else m.latest.watts,
                "allocated_seq": None if m.latest is None else m.latest.seq,
                "target_w": None if alloc is None else alloc.watts.get(h),
                "unmet_w": None if alloc is None else alloc.unmet_w.get(h),
                "may_hold_w": bounds[h] if math.isfinite(bounds[h]) else None,
                "in_force_w": None if r is None else r.in_force_w,
                "draw_w": None if r is None else r.draw_w,
                "demand_w": None if r is None else r.demand_w,
                "floor_w": None if r is None else r.floor_w,
                "urgency": None if r is None else r.urgency,
                "status_age_s": None if r is None else round(now_s - r.received_s, 3),
                "stale": r is None or now_s - r.received_s > self.params.stale_after_s,
            }
        total = math.fsum(bounds.values())
        return {
            "coordinator": self.coordinator_id,
            "group_budget_w": self.group_w,
            "may_hold_total_w": total if math.isfinite(total) else None,
            "warming_up": self.warming_up(now_s),
            "feasible": None if alloc is None else alloc.feasible,
            "unmet_w": None if alloc is None else alloc.unmet_total_w,
            "raise_blocked": [] if last is None else list(last.raise_blocked),
            "hosts": hosts,
        }
