"""Sliding-window signals of a vLLM server: rates from counter increases, latency quantiles
from histogram bucket deltas, per (model_name, engine) and summed per server.

Pure: scrapes come in with the time they were taken (`at_s`, any clock the caller uses); no
clock is read here. Counter resets (a restarted server) count as Prometheus's `increase` does:
a value below the previous one means the counter restarted from zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from palsd.core.types import Quantiles, ServerSignals
from palsd.sense.vllm_metrics import EngineKey, EngineSample, Histogram

DEFAULT_WINDOW_S = 10.0
QUANTILES = (0.5, 0.9, 0.99)

# Cumulative buckets (upper bound, count) as in Histogram.buckets, but holding increases.
Buckets = tuple[tuple[float, float], ...]


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
class SignalWindow:
    """The scrapes that span the last `window_s` seconds. Immutable: `push` returns a new one."""

    window_s: float = DEFAULT_WINDOW_S
    scrapes: tuple[Scrape, ...] = ()

    def push(self, at_s: float, engines: Mapping[EngineKey, EngineSample]) -> SignalWindow:
        # A clock that stepped back makes older scrapes meaningless as a baseline: drop them.
        kept = [s for s in self.scrapes if s.at_s < at_s]
        inside = [s for s in kept if s.at_s >= at_s - self.window_s]
        if not inside and kept:
            # Scrapes sparser than the window: keep the previous one so rates still exist.
            inside = [kept[-1]]
        return SignalWindow(self.window_s, (*inside, Scrape(at_s, dict(engines))))

    def report(self) -> WindowReport | None:
        """None before the first scrape. With one scrape, rates are 0 and window_s is 0."""
        if not self.scrapes:
            return None
        return derive(self.scrapes)


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


def _increase(values: Sequence[float | None]) -> float:
    total = 0.0
    for a, b in pairwise(values):
        if a is None or b is None:
            continue
        total += b - a if b >= a else b
    return total


def _hist_step(a: Histogram | None, b: Histogram | None) -> Buckets | None:
    """Bucket increases from a to b; all of b when the histogram restarted or changed bounds."""
    if a is None or b is None:
        return None
    if a.bounds != b.bounds or any(
        cb < ca for (_, ca), (_, cb) in zip(a.buckets, b.buckets, strict=True)
    ):
        return b.buckets
    return tuple((le, cb - ca) for (le, ca), (_, cb) in zip(a.buckets, b.buckets, strict=True))


def _hist_increase(values: Sequence[Histogram | None]) -> Buckets | None:
    acc: Buckets | None = None
    for a, b in pairwise(values):
        step = _hist_step(a, b)
        if step is None:
            continue
        if acc is None or tuple(le for le, _ in acc) != tuple(le for le, _ in step):
            acc = step  # bounds changed mid-window: only the newer bounds can be summed
        else:
            acc = tuple((le, x + y) for (le, x), (_, y) in zip(acc, step, strict=True))
    return acc


def merge_buckets(parts: Iterable[Buckets | None]) -> Buckets | None:
    """Sum cumulative buckets of several engines on the bounds they all share (+inf always)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
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


def _engine_window(key: EngineKey, scrapes: Sequence[Scrape]) -> _EngineWindow:
    samples = [s.engines.get(key) for s in scrapes]
    latest = samples[-1]
    assert latest is not None

    def values(name: str) -> list[float | None]:
        return [None if s is None else getattr(s, name) for s in samples]

    def hist(name: str) -> list[Histogram | None]:
        return [None if s is None else getattr(s, name) for s in samples]

    e2e = _hist_increase(hist("e2e"))
    requests_seen = any(v is not None for v in values("requests_finished"))
    # Without vllm:request_success (very old servers), finished requests are the e2e count.
    requests = (
        _increase(values("requests_finished")) if requests_seen else (e2e[-1][1] if e2e else 0.0)
    )
    return _EngineWindow(
        key=key,
        span_s=scrapes[-1].at_s - scrapes[0].at_s,
        latest=latest,
        prompt_tokens=_increase(values("prompt_tokens")),
        generation_tokens=_increase(values("generation_tokens")),
        preemptions=_increase(values("preemptions")),
        requests=requests,
        ttft=_hist_increase(hist("ttft")),
        itl=_hist_increase(hist("itl")),
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
    span_s = scrapes[-1].at_s - scrapes[0].at_s
    windows = [_engine_window(key, scrapes) for key in sorted(scrapes[-1].engines)]
    engines = tuple(
        EngineSignals(model_name=w.key[0], engine=w.key[1], signals=_signals([w], span_s))
        for w in windows
    )
    return WindowReport(server=_signals(windows, span_s), engines=engines)
