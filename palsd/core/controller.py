"""The joint controller: each GPU's power limit and each server's batch limit, from feedback.

Rules of this file (everything that decides a limit lives here; safety.py has the last word):
- Per server, a cap target moves on SLO headroom with a dead band: below `low_margin` it rises,
  above `high_margin` for `patience_s` it is lowered in small steps (or straight down to the
  measured draw plus a margin when the cap is not what holds the GPU back), and a violation
  jumps it to the lowest cap the online model has seen safe at this load. A cap the model has
  recently seen break the SLO at this load is not explored again (hysteresis).
- The batch limit trades inter-token latency against queueing: it grows while requests wait and
  ITL has room, and shrinks when ITL is over target and more power cannot be had (power-starved),
  so latency degrades into queueing (TTFT) instead of every token slowing down.
- When the targets do not fit the budget, the budget is split by urgency-weighted water-filling:
  every GPU gets its minimum, the rest goes to the GPUs that need it in proportion to their need
  times how short of their SLO their server is. Then fit_to_budget and limit_raise enforce the
  hard rules. Below the sum of minimums the decision is infeasible: minimums and shed batches.
- Missing data holds: a stale server keeps its cap and batch limit, a GPU whose power read failed
  keeps its current limit (unless the budget forces it down). Nothing here raises on missing data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from palsd.core.learn import ModelParams, ResponseModel
from palsd.core.safety import (
    drawn_power_w,
    excursion_w,
    fit_to_budget,
    limit_raise,
    raise_into_free_power,
)
from palsd.core.slo import Headroom, describe, headroom
from palsd.core.types import Decision, GpuObservation, Observation, ServerObservation


@dataclass(frozen=True)
class JointParams:
    control_caps: bool = True  # False: every cap at min(default, budget / GPUs) (PALS static)
    control_batch: bool = True  # False: every batch limit at fixed_batch_limit
    fixed_batch_limit: int | None = None  # None: the server's max_num_seqs (vLLM's default)
    initial_batch_limit: int | None = None  # None: start from what the server reports
    low_margin: float = 0.10  # SLO headroom below this: raise the cap
    high_margin: float = 0.25  # headroom above this for patience_s: explore a lower cap
    patience_s: float = 3.0
    settle_s: float = 4.0  # after a change, wait this long before judging it (signal window)
    react_s: float = 1.5  # minimum spacing of emergency raises
    cap_step_down_w: float = 10.0
    cap_step_up_w: float = 25.0
    danger_step_up_w: float = 75.0
    draw_margin_w: float = 40.0  # a cap this far above the draw does not bind
    batch_step_frac: float = 0.25
    batch_settle_s: float = 3.0
    min_batch_limit: int = 1
    shed_batch_limit: int = 8  # batch limit ceiling while the budget is infeasible
    urgency_gain: float = 4.0  # how much an SLO shortfall weighs in the budget split
    max_raise_w_per_tick: float | None = 150.0
    # Plan this share below the budget: the firmware's cap loop overshoots for a moment when
    # load jumps, so limits that sum exactly to the budget let the drawn power poke above it.
    budget_guard_frac: float = 0.02
    # ... and the guard grows to what the host was recently seen to overshoot its limits by
    # (sampled at ticks, so scaled up), remembered for excursion_memory_s; before anything has
    # been seen (cold start) it is cold_guard_frac.
    excursion_gain: float = 2.0
    excursion_memory_s: float = 600.0
    cold_guard_frac: float = 0.25  # at start and for cold_s after each budget change
    cold_s: float = 60.0
    model: ModelParams = field(default_factory=ModelParams)


@dataclass
class _ServerState:
    model: ResponseModel
    cap_w: float | None = None  # per-GPU target before the budget split
    batch_limit: int | None = None
    slack_since_s: float | None = None
    cap_changed_s: float = -math.inf
    batch_changed_s: float = -math.inf
    starved: bool = False  # wanted more watts than the budget split gave it last tick


def weighted_fill(
    gpus: Sequence[GpuObservation],
    wants_w: Mapping[int, float],
    urgency: Mapping[int, float],
    budget_w: float,
) -> dict[int, float]:
    """Every GPU gets its minimum; the rest of the budget goes out in proportion to each GPU's
    unmet want times its urgency, capped at the want, until the budget or the wants run out."""
    alloc = {g.index: g.min_limit_w for g in gpus}
    want = {g.index: max(g.min_limit_w, wants_w.get(g.index, g.min_limit_w)) for g in gpus}
    left = budget_w - sum(alloc.values())
    for _ in range(len(gpus) + 1):
        need = {i: want[i] - alloc[i] for i in alloc if want[i] - alloc[i] > 1e-9}
        if left <= 1e-9 or not need:
            break
        weight = {i: need[i] * urgency.get(i, 1.0) for i in need}
        total = sum(weight.values())
        given = 0.0
        for i, w in weight.items():
            give = min(need[i], left * w / total)
            alloc[i] += give
            given += give
        left -= given
    return alloc


class JointController:
    name = "joint"

    def __init__(self, params: JointParams | None = None) -> None:
        self.params = params or JointParams()
        self._servers: dict[str, _ServerState] = {}
        self._excursions: list[tuple[float, float]] = []  # (now_s, host excursion W), recent
        self._cold_since_s: float | None = None
        self._last_budget_w: float | None = None

    def _guard_w(self, now_s: float, gpus: Sequence[GpuObservation], budget_w: float) -> float:
        """Watts to plan below the budget: room for the cap loop's overshoot, learned online."""
        p = self.params
        if self._cold_since_s is None or budget_w != self._last_budget_w:
            # A new budget: what the limits overshot under the old one says little about the
            # new one (limits that did not bind never overshoot), so start cautious again.
            self._cold_since_s = now_s
            self._last_budget_w = budget_w
        self._excursions.append((now_s, excursion_w(gpus)))
        while self._excursions and now_s - self._excursions[0][0] > p.excursion_memory_s:
            self._excursions.pop(0)
        seen = max(e for _, e in self._excursions)
        guard = max(p.budget_guard_frac * budget_w, p.excursion_gain * seen)
        if now_s - self._cold_since_s < p.cold_s:
            guard = max(guard, p.cold_guard_frac * budget_w)
        return guard

    # -- per-server steps -------------------------------------------------------------------

    def _state(self, srv: ServerObservation, sg: Sequence[GpuObservation]) -> _ServerState:
        st = self._servers.get(srv.name)
        if st is None:
            st = _ServerState(model=ResponseModel(self.params.model))
            self._servers[srv.name] = st
        if st.cap_w is None:
            st.cap_w = max(g.power_limit_w for g in sg)
        if st.batch_limit is None:
            st.batch_limit = (
                self.params.initial_batch_limit
                or srv.batch_limit
                or srv.max_num_seqs
                or self.params.fixed_batch_limit
                or 64
            )
        return st

    def _step_cap(
        self,
        now_s: float,
        srv: ServerObservation,
        st: _ServerState,
        h: Headroom,
        draw_w: float | None,
        floor_w: float,
        ceiling_w: float,
        reasons: list[str],
    ) -> None:
        p = self.params
        assert st.cap_w is not None and srv.signals is not None
        cap = min(max(st.cap_w, floor_w), ceiling_w)
        rps = srv.signals.requests_per_s
        since = now_s - st.cap_changed_s
        worst = h.worst
        if worst is not None and since >= p.settle_s and draw_w is not None:
            st.model.observe(
                now_s,
                cap,
                rps,
                srv.signals.generation_tokens_per_s,
                draw_w * len(srv.gpu_indices),
                worst,
            )
        new = cap
        why = ""
        if worst is None:
            st.slack_since_s = None  # no samples (idle or just started): nothing to judge
        elif worst < 0.0:
            st.slack_since_s = None
            if since >= p.react_s and cap < ceiling_w:
                good = st.model.known_good_cap(now_s, rps, cap, p.low_margin)
                new = max(cap + p.danger_step_up_w, good or 0.0)
                why = f"SLO missed ({describe(h)})"
        elif worst < p.low_margin:
            st.slack_since_s = None
            if since >= p.settle_s and cap < ceiling_w:
                new = cap + p.cap_step_up_w
                why = f"SLO headroom thin ({describe(h)})"
        elif worst > p.high_margin:
            if st.slack_since_s is None:
                st.slack_since_s = now_s
            if now_s - st.slack_since_s >= p.patience_s and since >= p.settle_s:
                new = cap - p.cap_step_down_w
                if draw_w is not None and draw_w + p.draw_margin_w < new:
                    new = draw_w + p.draw_margin_w  # the cap does not bind: lowering is free
                new = max(new, floor_w)
                if new < cap and st.model.unsafe_at_or_below(now_s, rps, new, p.low_margin):
                    new = cap
                    reasons.append(
                        f"{srv.name}: holding {cap:.0f} W; lower caps recently broke the SLO "
                        "at this load"
                    )
                else:
                    why = f"SLO headroom ample ({describe(h)}), exploring lower"
        else:
            st.slack_since_s = None  # inside the dead band: hold
        new = min(max(new, floor_w), ceiling_w)
        if abs(new - cap) >= 0.5:
            reasons.append(f"{srv.name}: cap {cap:.0f} -> {new:.0f} W per GPU: {why}")
            st.cap_changed_s = now_s
            st.slack_since_s = None
        st.cap_w = new

    def _step_batch(
        self,
        now_s: float,
        srv: ServerObservation,
        st: _ServerState,
        h: Headroom,
        at_ceiling: bool,
        max_seqs: int,
        reasons: list[str],
    ) -> None:
        p = self.params
        assert st.batch_limit is not None and srv.signals is not None
        if now_s - st.batch_changed_s < p.batch_settle_s:
            return
        sig = srv.signals
        old = st.batch_limit
        new = old
        why = ""
        power_starved = st.starved or at_ceiling
        if (
            h.itl is not None
            and h.itl < 0.0
            and power_starved
            and (h.ttft is None or h.ttft > p.low_margin)
        ):
            base = min(old, max(int(sig.running), 1))
            new = max(p.min_batch_limit, int(base * (1.0 - p.batch_step_frac)))
            why = f"ITL over target with no watts to spare ({describe(h)})"
        elif sig.waiting >= 1.0 and old < max_seqs and (h.itl is None or h.itl > p.low_margin):
            new = min(max_seqs, math.ceil(old * (1.0 + p.batch_step_frac)))
            why = f"{sig.waiting:.0f} waiting and ITL has room ({describe(h)})"
        if new != old:
            reasons.append(f"{srv.name}: batch limit {old} -> {new}: {why}")
            st.batch_changed_s = now_s
            st.batch_limit = new

    # -- the decision -----------------------------------------------------------------------

    def decide(self, obs: Observation) -> Decision:
        p = self.params
        gpus = {g.index: g for g in obs.gpus}
        budget_w = obs.budget.effective_w
        static_cap = None if budget_w is None else budget_w / max(len(obs.gpus), 1)
        reasons: list[str] = []
        wants: dict[int, float] = {}
        urgency: dict[int, float] = {}
        batch: dict[str, int] = {}
        owner: dict[str, list[int]] = {}
        stale: list[str] = []
        status: list[str] = []  # one line per server, after the lines that explain changes
        for srv in obs.servers:
            sg = [gpus[i] for i in srv.gpu_indices if i in gpus]
            if not sg:
                continue
            st = self._state(srv, sg)
            assert st.cap_w is not None and st.batch_limit is not None
            owner[srv.name] = [g.index for g in sg]
            floor_w = max(g.min_limit_w for g in sg)
            ceiling_w = min(g.default_limit_w for g in sg)
            max_seqs = max(srv.max_num_seqs or st.batch_limit, 1)
            shortfall = 0.0
            h_text = "signals stale"
            if srv.signals is None:
                stale.append(srv.name)
            else:
                h = headroom(srv.slo, srv.signals)
                h_text = describe(h)
                shortfall = max(0.0, p.low_margin - (h.worst if h.worst is not None else 1.0))
                if p.control_caps:
                    draws = [g.power_w for g in sg if g.power_w is not None]
                    draw = max(draws) if draws else None
                    self._step_cap(obs.now_s, srv, st, h, draw, floor_w, ceiling_w, reasons)
                if p.control_batch:
                    at_ceiling = st.cap_w >= ceiling_w - 0.5
                    self._step_batch(obs.now_s, srv, st, h, at_ceiling, max_seqs, reasons)
            if not p.control_caps:
                st.cap_w = ceiling_w if static_cap is None else min(ceiling_w, static_cap)
            if not p.control_batch:
                st.batch_limit = p.fixed_batch_limit or max_seqs
            st.batch_limit = min(max(st.batch_limit, 1), max_seqs)
            batch[srv.name] = st.batch_limit
            status.append(
                f"{srv.name}: cap {st.cap_w:.0f} W, batch limit {st.batch_limit}, {h_text}"
            )
            for g in sg:
                # A failed power read holds this GPU's limit (the budget may still lower it).
                held = g.power_w is None and p.control_caps
                wants[g.index] = g.power_limit_w if held else st.cap_w
                urgency[g.index] = 1.0 + p.urgency_gain * shortfall
        for g in obs.gpus:
            if g.index not in wants:  # a GPU no server uses: leave it where it is
                wants[g.index] = g.power_limit_w
        if stale:
            reasons.append(f"stale signals, holding last decisions: {', '.join(stale)}")

        plan_w = budget_w
        if budget_w is not None and p.control_caps:  # static caps (batch_only) stay as PALS's
            sum_min = sum(g.min_limit_w for g in obs.gpus)
            guard_w = self._guard_w(obs.now_s, obs.gpus, budget_w)
            plan_w = max(min(budget_w, sum_min), budget_w - guard_w)
            if p.control_batch and budget_w - guard_w < sum_min:
                self._shed_at_floor(obs, budget_w, batch, reasons)
        bound = plan_w is not None and sum(wants.values()) > plan_w + 1e-6
        targets = dict(wants)
        if bound and plan_w is not None:
            targets = weighted_fill(obs.gpus, wants, urgency, plan_w)
        current = {g.index: g.power_limit_w for g in obs.gpus}
        targets = limit_raise(current, targets, p.max_raise_w_per_tick)
        fitted = fit_to_budget(targets, obs.gpus, plan_w)
        self._note_allocation(owner, fitted.limits_w, bound or fitted.scaled)
        limits = fitted.limits_w
        if p.control_caps:
            # Hard rule: a raise only takes power that is free now, so a cap raised in the same
            # tick as another is lowered waits until the lowered GPU has actually come down.
            limits = raise_into_free_power(fitted.limits_w, obs.gpus, plan_w)
            waiting = sorted(i for i, w in limits.items() if w < fitted.limits_w[i] - 0.5)
            if waiting:
                reasons.append(
                    f"raises held back until lowered GPUs come down (drawn power): GPUs {waiting}"
                )

        if fitted.infeasible:
            mode = "infeasible"
            sum_min = sum(g.min_limit_w for g in obs.gpus)
            reasons.append(
                f"budget {budget_w:.0f} W is below the sum of minimum limits {sum_min:.0f} W: "
                f"every GPU at its minimum, batch limits shed to at most {p.shed_batch_limit}"
            )
            for name in batch:
                st = self._servers[name]
                st.batch_limit = max(1, min(batch[name], p.shed_batch_limit))
                batch[name] = st.batch_limit
        elif bound:
            mode = "budget-bound"
            reasons.append(
                f"budget {budget_w:.0f} W from {obs.budget.source.value} binds "
                f"(wanted {sum(wants.values()):.0f} W): split by SLO urgency"
            )
        elif obs.servers and len(stale) == len(owner):
            mode = "hold"
        else:
            mode = "efficiency"
        return Decision(
            power_limits_w=limits,
            batch_limits=batch,
            reasons=(*reasons, *status),
            mode=mode,
            infeasible=fitted.infeasible,
        )

    def _shed_at_floor(
        self, obs: Observation, budget_w: float, batch: dict[str, int], reasons: list[str]
    ) -> None:
        """The caps are at their floor and cannot keep the margin below the budget: if the
        GPUs still draw above it (prefill bursts overshoot a minimum cap), less work is the
        only knob left, so shrink the batch limits of the servers drawing the most."""
        p = self.params
        # The 1 s average, not instant readings: a 100 ms prefill spike is not worth shedding
        # work for; a sustained excess is.
        drawn = sum(g.power_w if g.power_w is not None else drawn_power_w(g) for g in obs.gpus)
        if drawn <= budget_w:
            return
        for srv in obs.servers:
            st = self._servers.get(srv.name)
            if st is None or st.batch_limit is None or srv.signals is None:
                continue
            if obs.now_s - st.batch_changed_s < p.react_s:
                continue
            base = min(st.batch_limit, max(int(srv.signals.running), 1))
            new = max(p.min_batch_limit, int(base * (1.0 - p.batch_step_frac)))
            if new < st.batch_limit:
                reasons.append(
                    f"{srv.name}: batch limit {st.batch_limit} -> {new}: drawing "
                    f"{drawn:.0f} W above the {budget_w:.0f} W budget with every cap at its floor"
                )
                st.batch_limit = new
                st.batch_changed_s = obs.now_s
                batch[srv.name] = new

    def _note_allocation(
        self, owner: Mapping[str, list[int]], limits_w: Mapping[int, float], bound: bool
    ) -> None:
        """When the budget binds, pull each desire back to what it was given plus one step, so
        that a server starved by the budget keeps signalling need without ratcheting to the
        maximum, and remember that it was starved (the batch rule reads it next tick)."""
        for name, indices in owner.items():
            st = self._servers[name]
            got = max(limits_w[i] for i in indices)
            assert st.cap_w is not None
            st.starved = bound and st.cap_w > got + 0.5
            if bound and self.params.control_caps:
                st.cap_w = min(st.cap_w, got + self.params.cap_step_up_w)
