"""Windowed signals: rates from counter increases (resets included), quantiles from bucket
deltas, the window's span, several engines summed per server."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palsd.sense.signals import SignalWindow, merge_buckets, quantile
from palsd.sense.vllm_metrics import EngineSample, Histogram

BOUNDS = (0.1, 0.2, 0.5, 1.0)


def hist(*cum: float) -> Histogram:
    """Cumulative counts for BOUNDS and then +inf."""
    assert len(cum) == len(BOUNDS) + 1
    return Histogram(
        buckets=tuple(zip((*BOUNDS, math.inf), cum, strict=True)), count=cum[-1], sum_s=0.0
    )


def sample(engine: str = "0", model: str = "m", **kw: object) -> EngineSample:
    base: dict[str, object] = dict(
        running=1.0, waiting=0.0, kv_cache_usage=0.1, prompt_tokens=0.0,
        generation_tokens=0.0, preemptions=0.0, requests_finished=0.0,
        ttft=hist(0, 0, 0, 0, 0), itl=hist(0, 0, 0, 0, 0), e2e=hist(0, 0, 0, 0, 0),
    )  # fmt: skip
    base.update(kw)
    return EngineSample(model_name=model, engine=engine, **base)  # type: ignore[arg-type]


def window(*points: tuple[float, dict[str, object]], window_s: float = 10.0) -> SignalWindow:
    w = SignalWindow(window_s)
    for at_s, kw in points:
        s = sample(**kw)  # type: ignore[arg-type]
        w = w.push(at_s, {s.key: s})
    return w


@pytest.mark.parametrize(
    ("q", "cum", "want"),
    [
        (0.5, (0, 10, 10, 10, 10), 0.15),  # all in (0.1, 0.2]: halfway
        (0.5, (10, 10, 10, 10, 10), 0.05),  # first bucket interpolates from 0
        (0.9, (0, 0, 0, 0, 10), 1.0),  # beyond the last finite bound: that bound
        (0.99, (5, 5, 5, 5, 10), 1.0),
        (0.5, (0, 0, 0, 0, 0), None),  # nothing observed
    ],
)
def test_quantile_interpolates_like_prometheus(
    q: float, cum: tuple[float, ...], want: float | None
) -> None:
    got = quantile(q, hist(*cum).buckets)
    assert got == (None if want is None else pytest.approx(want))


def test_rates_are_increases_over_the_window_span() -> None:
    w = window((0.0, {"generation_tokens": 100.0}), (4.0, {"generation_tokens": 500.0}))
    r = w.report()
    assert r is not None
    assert r.server.window_s == 4.0
    assert r.server.generation_tokens_per_s == 100.0


def test_counter_reset_counts_like_prometheus_increase() -> None:
    # 100 -> 150 (+50), restart -> 20 (+20), -> 50 (+30): 100 tokens in 3 s.
    w = window(
        (0.0, {"prompt_tokens": 100.0}),
        (1.0, {"prompt_tokens": 150.0}),
        (2.0, {"prompt_tokens": 20.0}),
        (3.0, {"prompt_tokens": 50.0}),
    )
    r = w.report()
    assert r is not None and r.server.prompt_tokens_per_s == pytest.approx(100.0 / 3.0)


def test_histogram_reset_takes_the_new_histogram_whole() -> None:
    w = window(
        (0.0, {"ttft": hist(50, 50, 50, 50, 50)}),
        (1.0, {"ttft": hist(0, 4, 4, 4, 4)}),  # restarted: 4 new, all in (0.1, 0.2]
    )
    r = w.report()
    assert r is not None and r.server.ttft_s.p50 == pytest.approx(0.15)


def test_quantiles_come_from_deltas_not_totals() -> None:
    # Long history of fast requests, then 10 slow ones inside the window.
    w = window(
        (0.0, {"e2e": hist(1000, 1000, 1000, 1000, 1000)}),
        (2.0, {"e2e": hist(1000, 1000, 1000, 1010, 1010)}),
    )
    r = w.report()
    assert r is not None and r.server.e2e_s.p50 == pytest.approx(0.75)


def test_old_scrapes_leave_the_window() -> None:
    w = window(
        (0.0, {"generation_tokens": 0.0}),
        (5.0, {"generation_tokens": 1000.0}),
        (10.0, {"generation_tokens": 1000.0}),
        (15.0, {"generation_tokens": 1000.0}),
        window_s=10.0,
    )
    r = w.report()
    assert r is not None and r.server.window_s == 10.0
    assert r.server.generation_tokens_per_s == 0.0  # the burst before 5 s is gone
    assert len(w.scrapes) == 3


def test_sparse_scrapes_keep_the_previous_one_as_baseline() -> None:
    w = window((0.0, {"requests_finished": 0.0}), (30.0, {"requests_finished": 60.0}))
    r = w.report()
    assert r is not None and (r.server.window_s, r.server.requests_per_s) == (30.0, 2.0)


def test_one_scrape_gives_gauges_and_zero_rates() -> None:
    r = window((0.0, {"running": 4.0, "generation_tokens": 99.0})).report()
    assert r is not None
    assert (r.server.running, r.server.generation_tokens_per_s, r.server.window_s) == (4, 0, 0)
    assert r.server.ttft_s.p50 is None


def test_clock_stepping_back_restarts_the_window() -> None:
    w = window((10.0, {"prompt_tokens": 0.0}), (5.0, {"prompt_tokens": 100.0}))
    assert [s.at_s for s in w.scrapes] == [5.0]


def test_engines_are_summed_per_server_and_kept_per_engine() -> None:
    def page(at: float) -> dict[tuple[str, str], EngineSample]:
        a = sample("0", running=2.0, waiting=1.0, kv_cache_usage=0.2,
                   generation_tokens=100.0 * at, ttft=hist(0, 0, 0, 0, 0) if at == 0
                   else hist(10, 10, 10, 10, 10))  # fmt: skip
        b = sample("1", running=3.0, waiting=4.0, kv_cache_usage=0.7,
                   generation_tokens=300.0 * at, ttft=hist(0, 0, 0, 0, 0) if at == 0
                   else hist(0, 0, 10, 10, 10))  # fmt: skip
        return {a.key: a, b.key: b}

    w = SignalWindow(10.0).push(0.0, page(0.0)).push(1.0, page(1.0))
    r = w.report()
    assert r is not None
    assert [(e.engine, e.signals.generation_tokens_per_s) for e in r.engines] == [
        ("0", 100.0),
        ("1", 300.0),
    ]
    assert (r.server.running, r.server.waiting) == (5.0, 5.0)
    assert r.server.generation_tokens_per_s == 400.0
    assert r.server.kv_cache_usage == 0.7  # the fullest engine
    # 10 TTFTs in (0, 0.1] and 10 in (0.2, 0.5]: the median sits at the first bucket's top.
    assert r.server.ttft_s.p50 == pytest.approx(0.1)
    assert r.engines[1].signals.ttft_s.p50 == pytest.approx(0.35)


def test_engine_that_appears_mid_window_has_no_rates_yet() -> None:
    a0 = sample("0", generation_tokens=0.0)
    a1 = sample("0", generation_tokens=10.0)
    b1 = sample("1", generation_tokens=5000.0)
    w = SignalWindow(10.0).push(0.0, {a0.key: a0}).push(1.0, {a1.key: a1, b1.key: b1})
    r = w.report()
    assert r is not None and r.server.generation_tokens_per_s == 10.0
    assert [e.engine for e in r.engines] == ["0", "1"]


def test_missing_families_read_as_zero_rates_and_no_quantiles() -> None:
    bare = dict(prompt_tokens=None, requests_finished=None, ttft=None, itl=None, e2e=None,
                kv_cache_usage=None)  # fmt: skip
    r = window((0.0, bare), (1.0, bare)).report()
    assert r is not None
    assert (r.server.prompt_tokens_per_s, r.server.requests_per_s) == (0.0, 0.0)
    assert r.server.kv_cache_usage is None and r.server.itl_s.p99 is None


def test_merge_uses_only_shared_bounds() -> None:
    a = ((0.1, 1.0), (0.2, 2.0), (math.inf, 3.0))
    b = ((0.2, 5.0), (math.inf, 5.0))
    assert merge_buckets([a, None, b]) == ((0.2, 7.0), (math.inf, 8.0))


counts = st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=20)


@given(counts)
def test_rates_are_never_negative_whatever_the_counter_does(values: list[float]) -> None:
    w = SignalWindow(1000.0)
    for i, v in enumerate(values):
        s = sample(generation_tokens=v)
        w = w.push(float(i), {s.key: s})
    r = w.report()
    assert r is not None and r.server.generation_tokens_per_s >= 0.0


@given(st.lists(st.integers(0, 50), min_size=5, max_size=5))
def test_quantiles_are_ordered_and_within_bounds(per_bucket: list[int]) -> None:
    cum = [float(sum(per_bucket[: i + 1])) for i in range(5)]
    h = hist(*cum).buckets
    got = [quantile(q, h) for q in (0.5, 0.9, 0.99)]
    if cum[-1] == 0:
        assert got == [None, None, None]
        return
    assert all(g is not None and 0.0 <= g <= BOUNDS[-1] for g in got)
    assert got == sorted(got)  # type: ignore[type-var]
