"""Sliding-window signals of a vLLM server: rates from counter increases, latency quantiles
from histogram bucket deltas, per (model_name, engine) and summed per server.

Pure: scrapes come in with the time they were taken (`at_s`, any clock the caller uses); no
clock is read here. Counter resets (a restarted server) count as Prometheus's `increase` does:
a value below the previous one means the counter restarted from zero.

Incremental where it pays: the increases between two consecutive scrapes (a `_Step` per engine)
are computed once, when the newer scrape is pushed, and kept with the window; a report only
folds the steps still inside it, in the same order `derive` always has, so the numbers are the
same to the last bit (a daemon reports 16 windows of 21 scrapes a second: recomputing every
step each time was most of its own CPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from operator import add, lt, sub

from palsd.core.types import Quantiles, ServerSignals
from palsd.sense.vllm_metrics import EngineKey, EngineSample, Histogram

DEFAULT_WINDOW_S = 10.0
QUANTILES = (0.5, 0.9, 0.99)

# Cumulative buckets (upper bound, count) as in Histogram.buckets, but holding increases.
Buckets = tuple[tuple[float, float], ...]

# A histogram step: (bounds, count increases, exact). `exact`: the same bounds on both pages,
# no count went back, and every count is a whole number below 2**53, so any run of exact steps
# sums to (newest - oldest) with no rounding at all.
HistStep = tuple[tuple[float, ...], tuple[float, ...], bool]


@dataclass(frozen=True)
class Scrape:
    at_s: float
    engines: Mapping[EngineKey, EngineSample]


@dataclass(frozen=True)
class EngineSignals:
    model_name: str
    engine: str
    signals: ServerSignals


@dataclass(frozen=True)
class WindowReport:
    """The server's signals (summed over engines) and each engine's own."""

    server: ServerSignals
    engines: tuple[EngineSignals, ...]


@dataclass(frozen=True)
class _Step:
    """One engine's increases from one scrape to the next; None where either page lacks the
    family. Histogram steps carry their bounds, so a fold compares tuples, not buckets."""

    prompt_tokens: float | None
    generation_tokens: float | None
    preemptions: float | None
    requests_finished: float | None
    ttft: HistStep | None
    itl: HistStep | None
    e2e: HistStep | None


# Steps between two consecutive scrapes, for each engine both pages hold.
Steps = Mapping[EngineKey, _Step]


@dataclass(frozen=True)
class SignalWindow:
    """The scrapes that span the last `window_s` seconds. Immutable: `push` returns a new one.

    `steps[i]` holds the increases from `scrapes[i]` to `scrapes[i + 1]`; a window built
    without them (by hand) has them computed when first pushed to or reported."""

    window_s: float = DEFAULT_WINDOW_S
    scrapes: tuple[Scrape, ...] = ()
    steps: tuple[Steps, ...] = field(default=(), compare=False, repr=False)

    def push(self, at_s: float, engines: Mapping[EngineKey, EngineSample]) -> SignalWindow:
        # A clock that stepped back makes older scrapes meaningless as a baseline: drop them.
        kept = [s for s in self.scrapes if s.at_s < at_s]
        inside = [s for s in kept if s.at_s >= at_s - self.window_s]
        if not inside and kept:
            # Scrapes sparser than the window: keep the previous one so rates still exist.
            inside = [kept[-1]]
        new = Scrape(at_s, dict(engines))
        if not inside:
            return SignalWindow(self.window_s, (new,), ())
        # `inside` is a run of consecutive scrapes (times only grow): its steps are a slice.
        first = len(kept) - len(inside)
        steps = self._all_steps()[first : first + len(inside) - 1]
        return SignalWindow(
            self.window_s, (*inside, new), (*steps, _steps_between(inside[-1], new))
        )

    def report(self) -> WindowReport | None:
        """None before the first scrape. With one scrape, rates are 0 and window_s is 0."""
        if not self.scrapes:
            return None
        return _derive(self.scrapes, self._all_steps())

    def _all_steps(self) -> tuple[Steps, ...]:
        if len(self.steps) == max(0, len(self.scrapes) - 1):
            return self.steps
        return tuple(_steps_between(a, b) for a, b in pairwise(self.scrapes))


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket holding rank q * total.

    None when nothing was observed. A rank in the +inf bucket answers the highest finite
    bound (the most the histogram can say).
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_cum = 0.0, 0.0
    for i, (le, cum) in enumerate(buckets):
        if cum >= rank:
            if math.isinf(le):
                return prev_le if i > 0 else None
            lower = prev_le if i > 0 else min(0.0, le)
            if cum <= prev_cum:
                return le
            return lower + (le - lower) * (rank - prev_cum) / (cum - prev_cum)
        prev_le, prev_cum = le, cum
    return None


def _quantiles(buckets: Buckets | None) -> Quantiles:
    if buckets is None:
        return Quantiles()
    p50, p90, p99 = (quantile(q, buckets) for q in QUANTILES)
    return Quantiles(p50=p50, p90=p90, p99=p99)


def _increase_step(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return b - a if b >= a else b


def _increase(steps: Iterable[float | None]) -> float:
    total = 0.0
    for step in steps:
        if step is not None:
            total += step
    return total


def _hist_step(a: Histogram | None, b: Histogram | None) -> HistStep | None:
    """Bucket increases from a to b; all of b when the histogram restarted or changed bounds."""
    if a is None or b is None:
        return None
    bounds, new = b.bounds, b.counts
    if a.bounds != bounds:
        return bounds, new, False
    old = a.counts
    if any(map(lt, new, old)):
        return bounds, new, False
    return bounds, tuple(map(sub, new, old)), a.whole and b.whole


def _hist_increase(steps: Iterable[HistStep | None]) -> Buckets | None:
    acc: tuple[float, ...] | None = None
    acc_bounds: tuple[float, ...] = ()
    for step in steps:
        if step is None:
            continue
        bounds, counts, _ = step
        if acc is None or acc_bounds != bounds:
            acc, acc_bounds = counts, bounds  # bounds changed: only the newer can be summed
        else:
            acc = tuple(map(add, acc, counts))
    return None if acc is None else tuple(zip(acc_bounds, acc, strict=True))


def _hist_window(
    steps: Sequence[HistStep | None], oldest: Histogram | None, newest: Histogram | None
) -> Buckets | None:
    """_hist_increase of `steps`, the steps between every two consecutive scrapes from `oldest`
    to `newest`: when all are exact, newest minus oldest (the same numbers, without the fold).
    A single step is its own increase already."""
    if (
        len(steps) > 1
        and oldest is not None
        and newest is not None
        and all(s and s[2] for s in steps)
    ):
        return tuple(zip(newest.bounds, map(sub, newest.counts, oldest.counts), strict=True))
    return _hist_increase(steps)


def _steps_between(a: Scrape, b: Scrape) -> dict[EngineKey, _Step]:
    steps = {}
    for key, new in b.engines.items():
        old = a.engines.get(key)
        if old is None:
            continue  # an engine that just appeared has no increases yet
        steps[key] = _Step(
            prompt_tokens=_increase_step(old.prompt_tokens, new.prompt_tokens),
            generation_tokens=_increase_step(old.generation_tokens, new.generation_tokens),
            preemptions=_increase_step(old.preemptions, new.preemptions),
            requests_finished=_increase_step(old.requests_finished, new.requests_finished),
            ttft=_hist_step(old.ttft, new.ttft),
            itl=_hist_step(old.itl, new.itl),
            e2e=_hist_step(old.e2e, new.e2e),
        )
    return steps


def merge_buckets(parts: Iterable[Buckets | None]) -> Buckets | None:
    """Sum cumulative buckets of several engines on the bounds they all share (+inf always)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) == 1:  # one engine (the common case): the same sums, without the sets
        return tuple(sorted({le: 0.0 + cum for le, cum in present[0]}.items()))
    shared = set.intersection(*(set(le for le, _ in p) for p in present))
    total: dict[float, float] = {}
    for p in present:
        for le, cum in p:
            if le in shared:
                total[le] = total.get(le, 0.0) + cum
    return tuple(sorted(total.items()))


@dataclass(frozen=True)
class _EngineWindow:
    key: EngineKey
    span_s: float
    latest: EngineSample
    prompt_tokens: float
    generation_tokens: float
    preemptions: float
    requests: float
    ttft: Buckets | None
    itl: Buckets | None
    e2e: Buckets | None


def _engine_window(
    key: EngineKey, scrapes: Sequence[Scrape], steps: Sequence[Steps]
) -> _EngineWindow:
    latest = scrapes[-1].engines[key]
    mine = [s[key] for s in steps if key in s]
    # In every scrape of the window: the oldest and newest pages bound every step.
    oldest = scrapes[0].engines.get(key) if len(mine) == len(steps) else None

    def hist(name: str) -> Buckets | None:
        ends = (None, None) if oldest is None else (getattr(oldest, name), getattr(latest, name))
        return _hist_window([getattr(m, name) for m in mine], *ends)

    e2e = hist("e2e")
    requests_seen = any(
        (e := s.engines.get(key)) is not None and e.requests_finished is not None for s in scrapes
    )
    # Without vllm:request_success (very old servers), finished requests are the e2e count.
    requests = (
        _increase(m.requests_finished for m in mine)
        if requests_seen
        else (e2e[-1][1] if e2e else 0.0)
    )
    return _EngineWindow(
        key=key,
        span_s=scrapes[-1].at_s - scrapes[0].at_s,
        latest=latest,
        prompt_tokens=_increase(m.prompt_tokens for m in mine),
        generation_tokens=_increase(m.generation_tokens for m in mine),
        preemptions=_increase(m.preemptions for m in mine),
        requests=requests,
        ttft=hist("ttft"),
        itl=hist("itl"),
        e2e=e2e,
    )


def _signals(windows: Sequence[_EngineWindow], span_s: float) -> ServerSignals:
    def rate(total: float) -> float:
        return total / span_s if span_s > 0 else 0.0

    kv = [w.latest.kv_cache_usage for w in windows if w.latest.kv_cache_usage is not None]
    return ServerSignals(
        running=sum(w.latest.running or 0.0 for w in windows),
        waiting=sum(w.latest.waiting or 0.0 for w in windows),
        # The fullest engine's: preemption starts there, whatever the others hold.
        kv_cache_usage=max(kv) if kv else None,
        requests_per_s=rate(sum(w.requests for w in windows)),
        prompt_tokens_per_s=rate(sum(w.prompt_tokens for w in windows)),
        generation_tokens_per_s=rate(sum(w.generation_tokens for w in windows)),
        preemptions_per_s=rate(sum(w.preemptions for w in windows)),
        ttft_s=_quantiles(merge_buckets(w.ttft for w in windows)),
        itl_s=_quantiles(merge_buckets(w.itl for w in windows)),
        e2e_s=_quantiles(merge_buckets(w.e2e for w in windows)),
        window_s=span_s,
    )


def derive(scrapes: Sequence[Scrape]) -> WindowReport:
    """Signals over scrapes (oldest first): gauges from the newest scrape, rates and
    quantiles from the increases between consecutive scrapes. Engines are those on the
    newest page; one that vanished is gone, one that just appeared has no rates yet."""
    return _derive(scrapes, [_steps_between(a, b) for a, b in pairwise(scrapes)])


def _derive(scrapes: Sequence[Scrape], steps: Sequence[Steps]) -> WindowReport:
    span_s = scrapes[-1].at_s - scrapes[0].at_s
    windows = [_engine_window(key, scrapes, steps) for key in sorted(scrapes[-1].engines)]
    engines = tuple(
        EngineSignals(model_name=w.key[0], engine=w.key[1], signals=_signals([w], span_s))
        for w in windows
    )
    # One engine (most servers): the server's signals are that engine's, the same computation.
    server = engines[0].signals if len(engines) == 1 else _signals(windows, span_s)
    return WindowReport(server=server, engines=engines)
