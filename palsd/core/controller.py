"""The joint controller: each GPU's power limit and each server's batch limit, from feedback.

Rules of this file (everything that decides a limit lives here; safety.py has the last word):
- Objective: the most tokens per joule of host energy (PALS's P_host = 1.05 x sum(P_GPU) + a
  fixed draw) subject to each server's SLO and the host budget. Each server's efficiency curve
  (tokens/J against its cap, per load level) is learned online (learn.py); nothing is profiled
  beforehand and nothing is told which GPU or model it runs.
- Per server, the SLO comes first: a missed SLO raises the cap at once (to the lowest cap the
  model has seen safe at this load, or by a large step); thin headroom raises it a step. Load
  steps are met by feed-forward: when the queue or the concurrency jumps further than the
  headroom can absorb, the cap rises before the latency quantiles (which lag by the measurement
  window) show it, in proportion to the projected shortfall, and once the concurrency is back
  where it was the raise is taken back at once. Headroom that falls fast (a prefill
  wave stalling the decode steps) raises the cap before the window shows a miss.
- Otherwise the cap climbs the efficiency curve: a cap is judged only after it has held for a
  whole measurement window (`dwell_s`); an unmeasured neighbour (one step down when headroom is
  ample, one step up) is probed, a measured one that is better by `efficiency_eps` is moved to.
  A cap well above the draw does not bind and is lowered to the draw plus a margin (free).
  A cap the model recently saw break the SLO at this load is not probed again (hysteresis).
- The batch limit grows while requests wait with ITL room, and shrinks when ITL is clearly over
  target (beyond low_margin) with the cap at its maximum (not when the budget starves the
  server: there a shrink only builds a queue, and the budget split answers the miss), or when
  the budget is still exceeded with every cap at its floor.
  Shrink and grow share one hysteresis: a limit that had to be shrunk becomes a ceiling that
  growth may not reach again for `batch_memory_s`, and growth under a binding budget needs the
  drawn power to sit a band below the budget, so at a fixed infeasible budget the limit settles.
- A server whose batch control is unavailable (`batch_limit is None`) is controlled by cap only.
- When the targets do not fit the budget, the budget is split by urgency-weighted water-filling;
  then fit_to_budget, limit_raise and the free-power rule enforce the hard rules.
- Missing data holds: a stale server keeps its cap and batch limit, a GPU whose power read failed
  keeps its current limit (unless the budget forces it down). Nothing here raises on missing data.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from palsd.core.learn import ModelParams, ResponseModel
from palsd.core.safety import (
    drawn_power_w,
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
    # Where the batch limit starts: PALS's 64, from which a queue grows it (up to the server's
    # max_num_seqs) within seconds; None: start from what the server reports.
    initial_batch_limit: int | None = 64
    low_margin: float = 0.25  # SLO headroom below this: raise the cap
    high_margin: float = 0.50  # headroom above this: a lower cap may be probed
    dwell_s: float = 10.0  # a cap is judged after holding this long (the signal window)
    settle_s: float = 5.0  # spacing of raises on thin headroom (half the window)
    react_s: float = 3.0  # minimum spacing of emergency raises (the window lags a raise)
    cap_step_w: float = 25.0  # efficiency probing step; doubles (up to 4x) while moves agree
    cap_step_up_w: float = 25.0
    danger_step_up_w: float = 75.0
    draw_margin_w: float = 40.0  # a cap this far above the draw does not bind
    efficiency_eps: float = 0.01  # a neighbour must beat the current cap by this share ...
    noise_gain: float = 0.5  # ... or by the window's noise, noise_gain / sqrt(requests)
    # Host power (PALS's IPMI fit, arXiv 2605.21427): 1.05 x sum(P_GPU) + host_fixed_w.
    host_gpu_factor: float = 1.05
    host_fixed_w: float = 345.0
    # Feed-forward: concurrency (running + waiting) this much above where the cap was last set,
    # or this many requests waiting, raises the cap before the latency window shows it.
    ff_jump: float = 0.2
    ff_gain: float = 1.0
    ff_waiting: float = 8.0
    ff_min_requests: float = 8.0  # ... and at least this many more requests in flight
    # A load feed-forward raise is undone once the concurrency is back within this share of
    # ff_jump of where it had been (the burst has passed).
    ff_undo_frac: float = 0.5
    # SLO headroom down by this much within fall_s (a prefill wave stalling the decode steps):
    # raise at once, at most every fall_react_s, rather than wait for the window to show a miss.
    fall_frac: float = 0.25
    fall_s: float = 2.0
    fall_react_s: float = 1.0
    # ... or the prefill intensity (prompt tokens per generated token, which the request mix
    # sets and the load level does not) this much above where the cap was last set: a
    # long-prompt phase lowers the concurrency but its prefills stall the decode steps, so
    # ITL breaks within a few seconds at a cap set for chat.
    ff_prefill_jump: float = 0.4
    ff_prefill_ref_weight: float = 0.05  # the reference's EWMA weight per tick (~10 s)
    # A prefill step raises more than a load step of the same size (ITL jumps, see above).
    ff_prefill_gain: float = 1.0
    ff_prefill_noise: float = 4.0
    batch_step_frac: float = 0.25
    batch_settle_s: float = 3.0
    batch_memory_s: float = 300.0  # a batch limit that had to shrink is a ceiling this long
    batch_band_frac: float = 0.05  # growth at the floor needs drawn power this far below budget
    min_batch_limit: int = 1
    shed_batch_limit: int = 8  # batch limit ceiling while the budget is infeasible
    urgency_gain: float = 4.0  # how much an SLO shortfall weighs in the budget split
    max_raise_w_per_tick: float | None = 150.0
    # Plan this share below the budget: the firmware's cap loop overshoots for a moment when
    # load jumps, so limits that sum exactly to the budget let the drawn power poke above it.
    budget_guard_frac: float = 0.04
    # ... and the guard grows to what the host was recently seen to overshoot its limits by
    # (sampled at ticks, so scaled up), remembered for excursion_memory_s; for cold_s after
    # start and after each budget change it is at least cold_guard_frac (after a change, by
    # no more than the change's size: `_guard_w`).
    excursion_gain: float = 2.0
    excursion_memory_s: float = 600.0
    # A 1 s average lags a lowered limit: for this long after a GPU's limit came down its
    # excursion is measured against the highest limit it had in that time (the 1 s averaging
    # window plus the cap loop's settling), so a lowering is not mistaken for an overshoot.
    limit_lag_s: float = 1.5
    cold_guard_frac: float = 0.05
    # ... and at least this many watts per GPU: the first prefill burst at a newly lowered
    # limit lands while the clock is still where the old limit (or idle) left it, and the 1 s
    # average overshoots the limit by ~30 W per H100 before the cap loop has pulled it down,
    # whatever the budget (a share of a low budget is too thin for it). Only for cold_burst_s:
    # once the cap loop and the 1 s average have settled, the learned excursion takes over.
    cold_guard_w_per_gpu: float = 40.0
    cold_burst_s: float = 5.0
    cold_s: float = 20.0
    model: ModelParams = field(default_factory=ModelParams)


@dataclass
class _ServerState:
    model: ResponseModel
    cap_w: float | None = None  # per-GPU target before the budget split
    batch_limit: int | None = None
    cap_changed_s: float = -math.inf
    cap_raised_s: float = -math.inf  # last raise for the SLO or by feed-forward
    batch_changed_s: float = -math.inf
    starved: bool = False  # wanted more watts than the budget split gave it last tick
    first_seen_s: float = -math.inf
    probed_up: bool = False  # the last change probed a higher cap: measure it before lowering
    step_w: float = 0.0  # the efficiency search's current step (0: not started)
    step_dir: int = 0  # direction of the search's last move
    ref_load: float | None = None  # concurrency when the cap was last set (feed-forward)
    prefill: float | None = None  # smoothed prompt tokens per generated token
    ref_prefill: float | None = None  # its slow average, reset when the cap is set
    load: float | None = None  # smoothed concurrency (running + waiting)
    # ... and averaged over the latency window: the load the windowed headroom reflects
    window_load: float | None = None
    seen_s: float | None = None  # the last tick
    ff_from_w: float | None = None  # the cap before a load feed-forward raised it ...
    ff_base_load: float | None = None  # ... and the concurrency it had been set for
    recent_worst: list[tuple[float, float]] = field(default_factory=list)  # (now_s, headroom)
    batch_ceiling: int | None = None  # a limit that had to shrink: growth stays below it ...
    ceiling_until_s: float = -math.inf  # ... until then


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


def _prefill_intensity(prompt_tokens_per_s: float, generation_tokens_per_s: float) -> float | None:
    """Prompt tokens per generated token in the window: what the request mix asks of prefill
    against decode (chat ~2, long prompts ~30), whatever the load level. None while idle."""
    if prompt_tokens_per_s <= 0.0 or generation_tokens_per_s <= 0.0:
        return None
    return prompt_tokens_per_s / generation_tokens_per_s


def _projected_shortfall(worst: float | None, jump: float, low_margin: float) -> float:
    """How far (a share) a load jump would take the latency beyond 1 - low_margin of its
    target, were it to grow in proportion to the concurrency; with no latency measured, the
    jump itself."""
    if worst is None:
        return jump
    return (1.0 - worst) * (1.0 + jump) / (1.0 - low_margin) - 1.0


class JointController:
    name = "joint"

    def __init__(self, params: JointParams | None = None) -> None:
        self.params = params or JointParams()
        self._servers: dict[str, _ServerState] = {}
        # (now_s, host excursion W) within excursion_memory_s, only those that may still be
        # its largest: each is newer and smaller than the one before, so the first is the max
        self._excursions: deque[tuple[float, float]] = deque()
        self._limits_seen: list[tuple[float, dict[int, float]]] = []  # (now_s, limits), recent
        self._cold_since_s: float | None = None
        self._last_budget_w: float | None = None
        self._last_guard_w = 0.0
        # How far the last budget change may lower the plan beyond its own size (None: the
        # first budget, every caution applies)
        self._plan_floor_w: float | None = None  # after a raise: the plan before it
        self._cut_w: float | None = None  # after a cut: its size
        self._budget_for_ceilings: float | None = None

    def _guard_w(self, now_s: float, gpus: Sequence[GpuObservation], budget_w: float) -> float:
        """Watts to plan below the budget: room for the cap loop's overshoot, learned online."""
        p = self.params
        if self._cold_since_s is None or budget_w != self._last_budget_w:
            # A new budget: what the limits overshot under the old one says little about the
            # new one (limits that did not bind never overshoot), so start cautious again.
            last = self._last_budget_w
            self._plan_floor_w = self._cut_w = None
            if last is not None and budget_w > last:
                self._plan_floor_w = last - self._last_guard_w
            elif last is not None:
                self._cut_w = last - budget_w
            self._cold_since_s = now_s
            self._last_budget_w = budget_w
        # What counts against a budget is the 1 s averaged power (what the GPUs' own cap loop
        # holds and a facility meter integrates), so the guard learns its excursions above the
        # limits; 100 ms instant spikes would starve the host for nothing.
        limits = self._recent_limits_w(gpus)
        avg_excursion = max(
            0.0, sum((g.power_w or 0.0) - limits[g.index] for g in gpus if g.power_w is not None)
        )
        # The largest excursion of the memory, as a sliding-window maximum: an older entry
        # no larger than the new one can never be the largest again.
        while self._excursions and self._excursions[-1][1] <= avg_excursion:
            self._excursions.pop()
        self._excursions.append((now_s, avg_excursion))
        while now_s - self._excursions[0][0] > p.excursion_memory_s:
            self._excursions.popleft()
        seen = self._excursions[0][1]
        guard = max(p.budget_guard_frac * budget_w, p.excursion_gain * seen)
        cold = 0.0
        if now_s - self._cold_since_s < p.cold_s:
            cold = p.cold_guard_frac * budget_w
        if now_s - self._cold_since_s < p.cold_burst_s:
            cold = max(cold, p.cold_guard_w_per_gpu * len(gpus))
        # The first burst after a change overshoots by what the limits came down (the clocks
        # are still where the old limits left them), not by more: a raise lowers no limit, so
        # its caution never plans below the plan before it, and a cut's caution is at most the
        # cut on top of the guard (a fleet coordinator's rebalancing or a jittery feed moves
        # the budget by a few watts every few seconds; a full cold floor for each would starve
        # the host for as long as the budget moves).
        if self._plan_floor_w is not None:
            cold = min(cold, budget_w - self._plan_floor_w)
        if self._cut_w is not None:
            cold = min(cold, guard + self._cut_w)
        guard = max(guard, cold)
        self._last_guard_w = guard
        return guard

    def _note_limits(self, now_s: float, gpus: Sequence[GpuObservation]) -> None:
        self._limits_seen.append((now_s, {g.index: g.power_limit_w for g in gpus}))
        while self._limits_seen and now_s - self._limits_seen[0][0] > self.params.limit_lag_s:
            self._limits_seen.pop(0)

    def _recent_limits_w(self, gpus: Sequence[GpuObservation]) -> dict[int, float]:
        """Each GPU's highest limit within limit_lag_s: what its 1 s average may still show."""
        out = {g.index: g.power_limit_w for g in gpus}
        for _, seen in self._limits_seen:
            for i, w in seen.items():
                if i in out:
                    out[i] = max(out[i], w)
        return out

    def _lowered_recently(self, gpus: Sequence[GpuObservation]) -> bool:
        recent = self._recent_limits_w(gpus)
        return any(recent[g.index] > g.power_limit_w + 0.5 for g in gpus)

    # -- per-server steps -------------------------------------------------------------------

    def _state(
        self, srv: ServerObservation, sg: Sequence[GpuObservation], now_s: float
    ) -> _ServerState:
        st = self._servers.get(srv.name)
        if st is None:
            st = _ServerState(model=ResponseModel(self.params.model))
            self._servers[srv.name] = st
        if st.cap_w is None:
            st.cap_w = max(g.power_limit_w for g in sg)
            st.first_seen_s = now_s  # nothing measured at this cap yet: a full window first
        if st.batch_limit is None:
            st.batch_limit = (
                self.params.initial_batch_limit
                or srv.batch_limit
                or srv.max_num_seqs
                or self.params.fixed_batch_limit
                or 64
            )
        return st

    def _efficiency(
        self, st: _ServerState, now_s: float, rps: float, cap_w: float, host_share_w: float
    ) -> float | None:
        p = self.params
        return st.model.tokens_per_joule(
            now_s, rps, cap_w, power_factor=p.host_gpu_factor, extra_w=host_share_w
        )

    def _step_cap(
        self,
        now_s: float,
        srv: ServerObservation,
        st: _ServerState,
        h: Headroom,
        draw_w: float | None,
        server_w: float | None,
        floor_w: float,
        ceiling_w: float,
        host_share_w: float,
        reasons: list[str],
    ) -> None:
        p = self.params
        assert st.cap_w is not None and srv.signals is not None
        sig = srv.signals
        cap = min(max(st.cap_w, floor_w), ceiling_w)
        rps = sig.requests_per_s
        since = now_s - st.cap_changed_s
        held = now_s - max(st.cap_changed_s, st.first_seen_s)  # measured at this cap this long
        worst = h.worst
        # Concurrency, smoothed over ~2 s so that Poisson noise does not read as a load step.
        now_load = sig.running + sig.waiting
        st.load = now_load if st.load is None else st.load + 0.25 * (now_load - st.load)
        load = st.load
        dt = 0.0 if st.seen_s is None else max(0.0, now_s - st.seen_s)
        st.seen_s = now_s
        wl = st.window_load
        st.window_load = load if wl is None else wl + min(1.0, dt / p.dwell_s) * (load - wl)
        window_jump = load / max(st.window_load, 1.0) - 1.0
        if worst is not None and held >= p.dwell_s and server_w is not None:
            # The whole window was served at this cap: its tokens/s and power belong to it.
            st.model.observe(now_s, cap, rps, sig.generation_tokens_per_s, server_w, worst)
        elif worst is not None and worst < 0.0 and held >= p.react_s:
            # A miss is evidence at once (pessimistic): this cap is not safe at this load.
            st.model.note_unsafe(now_s, cap, rps)
        batch_binds = (
            p.control_batch
            and srv.batch_limit is not None
            and st.batch_limit is not None
            and sig.running >= st.batch_limit - 1
        )
        new = cap
        why = ""
        answers = False  # a raise for the latency or the mix (not a search step)
        load_step = False  # ... by the load feed-forward (undone when the load falls back)
        probe_up = False  # a search probe of an unmeasured higher cap
        # Feed-forward on a step of the concurrency since the cap was set, only when it is
        # larger than the headroom could absorb. A decode step's time grows with the batch at
        # most in proportion, so a load that leaves the projected latency, (1 - headroom) x
        # (load / the load the window's headroom was measured at) of the target, within
        # 1 - low_margin is served without a raise, and a larger one raises in proportion to
        # the projected shortfall, not to the jump (a raise to the maximum for every burst
        # the headroom absorbs is what cost the eight-server presets their efficiency). A
        # burst's own prefills can stall the steps beyond that; the headroom-falling rule
        # answers them within a second or two.
        jump = 0.0 if st.ref_load is None else load / max(st.ref_load, 1.0) - 1.0
        shortfall = _projected_shortfall(worst, window_jump, p.low_margin)
        ff_jump = (
            st.ref_load is not None
            and load - st.ref_load >= p.ff_min_requests
            and jump > p.ff_jump
            and shortfall > 0.0
            and now_load >= load  # still there, not a burst already passing
        )
        # The same for the request mix: the windowed prompt and generation rates move within
        # a few seconds of a shift to long prompts, before the ITL quantile does.
        now_prefill = _prefill_intensity(sig.prompt_tokens_per_s, sig.generation_tokens_per_s)
        if now_prefill is not None:
            # smoothed like the concurrency (~2 s); the reference is a slow average (~the
            # window), not the lowest value seen: against a trough, noise reads as a step
            st.prefill = (
                now_prefill if st.prefill is None else st.prefill + 0.5 * (now_prefill - st.prefill)
            )
        prefill = st.prefill
        prefill_jump = (
            0.0
            if prefill is None or st.ref_prefill is None
            else prefill / max(st.ref_prefill, 1e-9) - 1.0
        )
        # No headroom gate here (unlike the concurrency's): prefill chunks stall the decode
        # steps, so ITL does not grow in proportion but jumps (+50% headroom to a miss in ~3 s
        # on the twin when a long-prompt phase starts).
        # Prompt lengths vary widely (lognormal), so a window of few requests moves the share
        # by chance: the jump must also clear that noise, ff_prefill_noise / sqrt(requests).
        prefill_bar = max(
            p.ff_prefill_jump, p.ff_prefill_noise / math.sqrt(max(1.0, rps * p.dwell_s))
        )
        # And only while the concurrency has not jumped: a burst of chat requests raises the
        # share too (its prompts are counted at prefill, its tokens follow), but it queues
        # first; a shift to long prompts does not raise the concurrency. A burst is the load
        # feed-forward's (headroom-gated) to answer.
        ff_prefill = (
            prefill_jump > prefill_bar
            and sig.running + sig.waiting >= p.ff_min_requests
            and jump <= p.ff_jump
        )
        # Load steps are spaced by react_s from any cap change (a probe's own effect on the
        # concurrency is no load step); a shift of the mix only from the last raise (a probe
        # does not move the mix, and ITL breaks within seconds of a shift).
        ff_load_now = (
            ff_jump or (sig.waiting >= p.ff_waiting and not batch_binds)
        ) and since >= p.react_s
        ff_prefill_now = ff_prefill and now_s - st.cap_raised_s >= p.react_s
        falling = 0.0
        if worst is not None:
            st.recent_worst.append((now_s, worst))
            while st.recent_worst and now_s - st.recent_worst[0][0] > p.fall_s:
                st.recent_worst.pop(0)
            falling = max(w for _, w in st.recent_worst) - worst
        if worst is not None and worst < 0.0:
            if since >= p.react_s and cap < ceiling_w:
                good = st.model.known_good_cap(now_s, rps, cap, p.low_margin)
                new = max(cap + p.danger_step_up_w, good or 0.0)
                why = f"SLO missed ({describe(h)})"
                answers = True
        elif (
            worst is not None
            and falling > p.fall_frac
            and worst < p.high_margin
            and since >= p.fall_react_s
            and cap < ceiling_w
        ):
            # Headroom falling fast (a prefill wave stalling the decode steps): the window
            # will show a miss within seconds, so raise now in proportion to the fall.
            new = cap + max(p.cap_step_up_w, min(1.0, falling) * (ceiling_w - cap))
            why = f"SLO headroom falling fast ({describe(h)}; down {falling:.0%} in {p.fall_s:g} s)"
            answers = True
        elif (ff_load_now or ff_prefill_now) and cap < ceiling_w:
            # Feed-forward: the queue, the concurrency or the prefill share jumped; the latency
            # quantiles will show it only once the window has filled, so raise now, in
            # proportion. The window fills over dwell_s, so a step of the mix shows as a ramp
            # and the raises follow it (at most every react_s), settling with the window.
            ref = st.ref_load or load
            rise = min(
                1.0,
                max(
                    p.ff_gain * shortfall,
                    p.ff_prefill_gain * prefill_jump if ff_prefill_now else 0.0,
                    0.0,
                ),
            )
            good = st.model.known_good_cap(now_s, rps, cap, p.high_margin)
            new = max(cap + p.cap_step_up_w, cap + rise * (ceiling_w - cap), good or 0.0)
            answers = True
            if ff_load_now and st.ff_from_w is None:
                st.ff_from_w, st.ff_base_load = cap, ref
            load_step = ff_load_now
            if ff_prefill_now and not ff_load_now:
                why = (
                    f"prefill share up: {prefill:.1f} prompt tokens per generated token "
                    f"(was {st.ref_prefill:.1f}), feed-forward"
                )
            else:
                why = (
                    f"load step: {sig.running:.0f} running + {sig.waiting:.0f} waiting "
                    f"(was {ref:.0f}), feed-forward"
                )
        elif worst is not None and worst < p.low_margin:
            if since >= p.settle_s and cap < ceiling_w:
                new = cap + p.cap_step_up_w
                why = f"SLO headroom thin ({describe(h)})"
                answers = True
        elif worst is None:
            pass  # no samples (idle or just started): nothing to judge
        elif (
            st.ff_from_w is not None
            and st.ff_base_load is not None
            and load <= st.ff_base_load * (1.0 + p.ff_undo_frac * p.ff_jump)
            and worst > p.high_margin
            and since >= p.react_s
        ):
            # Feed-forward both ways: the burst that a raise answered has passed (the
            # concurrency is back near what the cap had been set for), so the cap goes back
            # to where it was at once rather than walking down a search step per window.
            new = st.ff_from_w
            why = (
                f"load back to {load:.0f} in flight (the raise was for a step from "
                f"{st.ff_base_load:.0f}): feed-forward undone"
            )
        elif (
            draw_w is not None
            and worst > p.high_margin
            and draw_w + p.draw_margin_w < cap - 0.5
            and held >= (p.dwell_s if st.probed_up else p.settle_s)
        ):
            new = max(floor_w, draw_w + p.draw_margin_w)
            why = f"cap does not bind (draw {draw_w:.0f} W): lowered to draw + margin"
        elif held >= p.dwell_s:
            new, why, probe_up = self._climb(
                now_s,
                srv.name,
                st,
                h,
                rps,
                sig.waiting,
                cap,
                draw_w,
                floor_w,
                ceiling_w,
                host_share_w,
            )
            if new == cap and why:
                reasons.append(why)
                why = ""
        new = min(max(new, floor_w), ceiling_w)
        changed = abs(new - cap) >= 0.5
        if st.ff_from_w is not None and (
            new <= st.ff_from_w + 0.5 or (changed and answers and not load_step)
        ):
            # undone, walked down past it, or raised for the latency or the mix: the cap is
            # no longer the load step's to take back
            st.ff_from_w = st.ff_base_load = None
        if changed:
            reasons.append(f"{srv.name}: cap {cap:.0f} -> {new:.0f} W per GPU: {why}")
            st.cap_changed_s = now_s
            st.probed_up = probe_up
            st.ref_load = load
        elif st.ref_load is None or load < st.ref_load:
            st.ref_load = load  # the reference follows the load down, not up
        # A raise that answered the latency or the mix was set for this prefill share;
        # otherwise (holding, or a search step) the reference keeps averaging.
        answered = changed and answers
        if answered:
            st.cap_raised_s = now_s
        if prefill is not None:
            ref_p = st.ref_prefill
            st.ref_prefill = (
                prefill
                if answered or ref_p is None
                else ref_p + p.ff_prefill_ref_weight * (prefill - ref_p)
            )
        st.cap_w = new

    def _climb(
        self,
        now_s: float,
        name: str,
        st: _ServerState,
        h: Headroom,
        rps: float,
        waiting: float,
        cap: float,
        draw_w: float | None,
        floor_w: float,
        ceiling_w: float,
        host_share_w: float,
    ) -> tuple[float, str, bool]:
        """One step of the efficiency search at this load: probe an unmeasured neighbour, or
        move to a measured one that is better: (the new cap, why, whether it probes an
        unmeasured higher cap); (cap, "", False) to stay."""
        p = self.params
        assert h.worst is not None
        here = self._efficiency(st, now_s, rps, cap, host_share_w)
        if here is None:
            return cap, "", False
        step = st.step_w or p.cap_step_w
        down = max(floor_w, cap - step)
        up = min(ceiling_w, cap + step)
        # Probing down needs ample headroom and an empty queue: TTFT falls off a cliff once
        # the capacity at a cap drops below the arrival rate, so a queue is the early sign.
        may_down = (
            down < cap - 0.5
            and h.worst > p.high_margin
            and waiting < 1.0
            and not st.model.unsafe_at_or_below(now_s, rps, down, p.low_margin)
        )
        # Probing up only means something where the cap binds (the GPUs draw close to it).
        binds = draw_w is None or draw_w >= cap - p.draw_margin_w
        may_up = up > cap + 0.5 and not st.starved and binds
        e_down = self._efficiency(st, now_s, rps, down, host_share_w) if may_down else None
        e_up = self._efficiency(st, now_s, rps, up, host_share_w) if may_up else None
        # What counts as "better" must clear the measurement's noise: tokens in a window are
        # a Poisson count, relative noise ~ 1/sqrt(requests in the window). Within the noise
        # the lower cap wins (it draws less and leaves more of any budget), so a probe upwards
        # stays only if it is clearly better, and a flat curve is walked down.
        eps = max(p.efficiency_eps, p.noise_gain / math.sqrt(max(1.0, rps * p.dwell_s)))
        choice: tuple[float, str, bool] | None = None
        if e_up is not None and e_up > here * (1.0 + eps):
            choice = (up, f"more tokens/J there ({e_up:.2f} vs {here:.2f})", False)
        elif e_down is not None and e_down * (1.0 + eps) > here:
            choice = (
                down,
                f"as many tokens/J there for less power ({e_down:.2f} vs {here:.2f})",
                False,
            )
        elif may_down and e_down is None:
            choice = (
                down,
                f"probing a lower cap ({describe(h)}; {here:.2f} tokens/J here)",
                False,
            )
        elif may_up and e_up is None:
            choice = (up, f"probing a higher cap ({here:.2f} tokens/J here)", True)
        if choice is not None:
            # A line search: the step doubles (up to 4x) while moves go the same way and
            # falls back to the base step when the direction turns.
            d = 1 if choice[0] > cap else -1
            # Down at most 2x (a lower cap risks the SLO), up at most 4x.
            top = (4 if d > 0 else 2) * p.cap_step_w
            st.step_w = min(top, 2 * step) if d == st.step_dir else p.cap_step_w
            st.step_dir = d
            return choice
        st.step_w, st.step_dir = p.cap_step_w, 0
        if h.worst > p.high_margin and down < cap - 0.5 and not may_down:
            return (
                cap,
                f"{name}: holding {cap:.0f} W; lower caps recently broke the SLO at this load",
                False,
            )
        return cap, "", False

    def _grow_room(
        self,
        st: _ServerState,
        now_s: float,
        old: int,
        max_seqs: int,
        ignore_itl_ceiling: bool,
        in_demand: float = 0.0,
    ) -> int:
        """The limit growth may reach: one step, or at once what the requests in flight and
        waiting ask for (a queue grows by the arrivals while the limit climbs step by step),
        below a recent ceiling (an ITL ceiling gives way when the queue hurts more than ITL; a
        budget ceiling never does)."""
        p = self.params
        step = math.ceil(old * (1.0 + p.batch_step_frac))
        target = min(max_seqs, max(step, math.ceil(in_demand)))
        active = st.batch_ceiling is not None and now_s < st.ceiling_until_s
        budget_ceiling = st.ceiling_until_s == math.inf
        if active and st.batch_ceiling is not None and (budget_ceiling or not ignore_itl_ceiling):
            target = min(target, st.batch_ceiling - 1)
        return max(target, old)

    def _shrink(
        self, st: _ServerState, now_s: float, old: int, new: int, for_budget: bool = False
    ) -> None:
        """Shrink the limit and make the old one a ceiling for growth: for batch_memory_s
        after an ITL shrink, and for as long as the budget stays what it is after a budget
        shed (a retry at the same budget would only be shed again: a limit cycle)."""
        p = self.params
        active = st.batch_ceiling is not None and now_s < st.ceiling_until_s
        st.batch_ceiling = min(st.batch_ceiling or old, old) if active else old
        until = math.inf if for_budget else now_s + p.batch_memory_s
        st.ceiling_until_s = max(st.ceiling_until_s, until) if active else until
        st.batch_limit = new
        st.batch_changed_s = now_s

    def _step_batch(
        self,
        now_s: float,
        srv: ServerObservation,
        st: _ServerState,
        h: Headroom,
        at_ceiling: bool,
        max_seqs: int,
        over_budget_at_floor: bool,
        reasons: list[str],
    ) -> None:
        p = self.params
        assert st.batch_limit is not None and srv.signals is not None
        if now_s - st.batch_changed_s < p.batch_settle_s:
            return
        sig = srv.signals
        old = st.batch_limit
        # ITL over target with no watts to be had: only at the ceiling (the cap at its
        # maximum), and only for a clear miss (ITL beyond low_margin over its target): a
        # marginal one is transient, and a shrink at a load the watts already hold near
        # capacity costs more in queueing than it saves in ITL (A100 twin: a shrink for a 10%
        # miss at 400 W queued 33 requests within 3 s).
        # Not when the budget starves the server: the urgency-weighted split answers the miss
        # within a tick or two, and a shrink there queued requests within 3 s, the queue grew
        # the limit straight back, and the cycle repeated every minute or two through the low
        # phases (demand response, 1 h, 5 seeds: 47.2 violating windows on average with
        # such shrinks, 44.4 without).
        clear_miss = h.itl is not None and h.itl < -p.low_margin
        at_the_wall = at_ceiling and not st.starved
        # A shrink trades ITL for queueing, and TTFT falls off a cliff once a queue forms: so
        # never shrink for ITL while requests already wait (the queue would only grow).
        if (
            h.itl is not None
            and clear_miss
            and at_the_wall
            and sig.waiting < 1.0
            and (h.ttft is None or (h.ttft > p.high_margin and h.ttft > h.itl))
        ):
            base = min(old, max(int(sig.running), 1))
            new = max(p.min_batch_limit, int(base * (1.0 - p.batch_step_frac)))
            if new < old:
                self._shrink(st, now_s, old, new)
                reasons.append(
                    f"{srv.name}: batch limit {old} -> {new}: ITL over target with no watts to "
                    f"spare ({describe(h)})"
                )
            return
        # Grow while requests wait and ITL has room, or while the queue hurts more than ITL
        # does (TTFT headroom below ITL's): the batch limit balances the two.
        # Starved by a budget, the watts are what limit and a larger batch serves more tokens
        # per watt (PALS): a queue then opens the limit fully, since TTFT falls off a cliff
        # while ITL degrades gradually.
        queue_hurts = h.ttft is not None and (h.itl is None or h.ttft < h.itl)
        if (
            sig.waiting >= 1.0
            and not over_budget_at_floor
            and (h.itl is None or h.itl > p.low_margin or queue_hurts or st.starved)
        ):
            new = self._grow_room(
                st,
                now_s,
                old,
                max_seqs,
                ignore_itl_ceiling=queue_hurts,
                in_demand=max_seqs if st.starved else sig.running + sig.waiting,
            )
            if new > old:
                st.batch_limit = new
                st.batch_changed_s = now_s
                reasons.append(
                    f"{srv.name}: batch limit {old} -> {new}: {sig.waiting:.0f} waiting and ITL "
                    f"has room ({describe(h)})"
                )
            elif st.batch_ceiling is not None and now_s < st.ceiling_until_s:
                reasons.append(
                    f"{srv.name}: batch limit held at {old}: {st.batch_ceiling} had to shrink "
                    f"{st.ceiling_until_s - now_s:.0f} s ago or less (hysteresis)"
                )

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
        host_share_w = p.host_fixed_w / max(len(obs.gpus), 1)
        if budget_w != self._budget_for_ceilings:
            # A new budget: ceilings that a budget shed left behind no longer apply.
            self._budget_for_ceilings = budget_w
            for st in self._servers.values():
                if st.ceiling_until_s == math.inf:
                    st.batch_ceiling, st.ceiling_until_s = None, -math.inf
        self._note_limits(obs.now_s, obs.gpus)
        sum_min = sum(g.min_limit_w for g in obs.gpus)
        guard_w = 0.0
        plan_w = budget_w
        sum_max = sum(g.max_limit_w for g in obs.gpus)
        # static caps (batch_only) stay as PALS's. A budget equal to the sum of the maximum
        # limits still needs the guard: GPUs at their maximum overshoot it for a moment like
        # any other limit (a dense 70B at its diurnal peak: 0.8 s above 8 x 700 W). Only a
        # budget a whole guard above every maximum is out of the cap loop's reach.
        if (
            budget_w is not None
            and p.control_caps
            and budget_w < sum_max * (1.0 + p.budget_guard_frac)
        ):
            guard_w = self._guard_w(obs.now_s, obs.gpus, budget_w)
            plan_w = max(min(budget_w, sum_min), budget_w - guard_w)
        # Averaged power (not instant spikes) above the budget with no room left above the
        # floor: the caps cannot give more, only less work can.
        at_floor = budget_w is not None and budget_w - guard_w < sum_min
        drawn = sum(g.power_w if g.power_w is not None else drawn_power_w(g) for g in obs.gpus)
        # ... and only against limits that already fit the budget (or sit at their minimums)
        # and have held for the 1 s average: right after a budget cut the average still shows
        # the old limits, and shedding for that would leave a ceiling on the batch for as long
        # as the budget holds.
        over_at_floor = (
            at_floor
            and budget_w is not None
            and drawn > budget_w
            and sum(g.power_limit_w for g in obs.gpus) <= max(budget_w, sum_min) + 1e-6
            and not self._lowered_recently(obs.gpus)
        )
        near_at_floor = (
            at_floor and budget_w is not None and drawn > budget_w * (1.0 - p.batch_band_frac)
        )
        for srv in obs.servers:
            sg = [gpus[i] for i in srv.gpu_indices if i in gpus]
            if not sg:
                continue
            st = self._state(srv, sg, obs.now_s)
            assert st.cap_w is not None and st.batch_limit is not None
            owner[srv.name] = [g.index for g in sg]
            floor_w = max(g.min_limit_w for g in sg)
            ceiling_w = min(g.default_limit_w for g in sg)
            max_seqs = max(srv.max_num_seqs or st.batch_limit, 1)
            # Batch control unavailable (plugin missing, unauthorised, unreachable, not read
            # yet): this server is controlled by its cap only and gets no batch limit.
            cap_only = srv.batch_limit is None or not srv.batch_controllable
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
                    server_w = sum(draws) if len(draws) == len(sg) else None
                    self._step_cap(
                        obs.now_s,
                        srv,
                        st,
                        h,
                        draw,
                        server_w,
                        floor_w,
                        ceiling_w,
                        host_share_w * len(sg),
                        reasons,
                    )
                if p.control_batch and not cap_only:
                    at_ceiling = st.cap_w >= ceiling_w - 0.5
                    self._step_batch(
                        obs.now_s, srv, st, h, at_ceiling, max_seqs, near_at_floor, reasons
                    )
            if not p.control_caps:
                st.cap_w = ceiling_w if static_cap is None else min(ceiling_w, static_cap)
            if not p.control_batch:
                st.batch_limit = p.fixed_batch_limit or max_seqs
            st.batch_limit = min(max(st.batch_limit, 1), max_seqs)
            if cap_only:
                why_not = srv.batch_control_reason or (
                    "limit not read yet" if srv.batch_controllable else srv.batch_control.value
                )
                status.append(
                    f"{srv.name}: cap {st.cap_w:.0f} W, cap only (batch control {why_not}), "
                    f"{h_text}"
                )
            else:
                batch[srv.name] = st.batch_limit
                status.append(
                    f"{srv.name}: cap {st.cap_w:.0f} W, batch limit {st.batch_limit}, {h_text}"
                )
            for g in sg:
                # A failed power read or stale signals hold this GPU's limit (the budget may
                # still lower it).
                hold = (g.power_w is None or srv.signals is None) and p.control_caps
                wants[g.index] = g.power_limit_w if hold else st.cap_w
                urgency[g.index] = 1.0 + p.urgency_gain * shortfall
        for g in obs.gpus:
            if g.index not in wants:  # a GPU no server uses: leave it where it is
                wants[g.index] = g.power_limit_w
        if stale:
            reasons.append(f"stale signals, holding last decisions: {', '.join(stale)}")
        if over_at_floor and p.control_batch and budget_w is not None:
            self._shed_at_floor(obs, budget_w, drawn, batch, reasons)

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
            reasons.append(
                f"budget {budget_w:.0f} W is below the sum of minimum limits {sum_min:.0f} W: "
                f"every GPU at its minimum, batch limits shed to at most {p.shed_batch_limit}"
            )
            for name in batch:
                st = self._servers[name]
                assert st.batch_limit is not None
                if st.batch_limit > p.shed_batch_limit:
                    self._shrink(st, obs.now_s, st.batch_limit, p.shed_batch_limit, for_budget=True)
                batch[name] = st.batch_limit
        elif bound:
            mode = "budget-bound"
            reasons.append(
                f"budget {budget_w:.0f} W from {obs.budget.source.value} binds (wanted "
                f"{sum(wants.values()):.0f} W, planned within {plan_w:.0f} W: a {guard_w:.0f} W "
                "guard for the cap loop's overshoot): split by SLO urgency"
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
        self,
        obs: Observation,
        budget_w: float,
        drawn_w: float,
        batch: dict[str, int],
        reasons: list[str],
    ) -> None:
        """The caps are at their floor and cannot keep the margin below the budget, and the
        GPUs' 1 s averaged power is still above it (prefill bursts overshoot a minimum cap):
        less work is the only knob left, so shrink every server's batch limit. The shrunk
        limit becomes a ceiling for growth (one hysteresis with the grow rule)."""
        p = self.params
        for srv in obs.servers:
            st = self._servers.get(srv.name)
            if st is None or st.batch_limit is None or srv.signals is None:
                continue
            if srv.name not in batch or obs.now_s - st.batch_changed_s < p.react_s:
                continue
            old = st.batch_limit
            base = min(old, max(int(srv.signals.running), 1))
            new = max(p.min_batch_limit, int(base * (1.0 - p.batch_step_frac)))
            if new < old:
                reasons.append(
                    f"{srv.name}: batch limit {old} -> {new}: drawing {drawn_w:.0f} W above the "
                    f"{budget_w:.0f} W budget with every cap at its floor"
                )
                self._shrink(st, obs.now_s, old, new, for_budget=True)
                batch[srv.name] = new

    def _note_allocation(
        self,
        owner: Mapping[str, list[int]],
        limits_w: Mapping[int, float],
        bound: bool,
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
