"""The incremental window (steps kept from push to push) reports exactly what `derive` computes
from the same scrapes from scratch, and the newest-minus-oldest shortcut for histograms equals
the step-by-step fold: equal to the last bit, whatever the pushes do (engines coming and going,
counters and histograms resetting, bounds changing, the clock stepping back, scrapes sparser
than the window, whole and fractional counts)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.sense.signals import SignalWindow, _hist_increase, _hist_window, derive
from palsd.sense.vllm_metrics import EngineSample, Histogram

BOUNDS = ((0.1, 0.5, 1.0), (0.1, 0.2, 0.5, 1.0))
counts = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@st.composite
def histograms(draw: st.DrawFn) -> Histogram | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    bounds = (*draw(st.sampled_from(BOUNDS)), math.inf)  # now and then the bounds change
    cum, total = [], 0.0
    for _ in bounds:
        # Whole counts (as vLLM's) take the exact shortcut; fractions the fold.
        total += draw(
            st.floats(min_value=0, max_value=1e4, allow_nan=False)
            | st.integers(0, 10**4).map(float)
        )
        cum.append(total)
    return Histogram(tuple(zip(bounds, cum, strict=True)), count=total, sum_s=0.0)


@st.composite
def pages(draw: st.DrawFn) -> dict[tuple[str, str], EngineSample]:
    page = {}
    for engine in draw(st.sets(st.sampled_from("012"), min_size=1)):
        opt = lambda: draw(st.none() | counts)  # noqa: E731
        s = EngineSample(
            model_name="m",
            engine=engine,
            running=opt(),
            waiting=opt(),
            kv_cache_usage=opt(),
            prompt_tokens=opt(),
            generation_tokens=opt(),
            preemptions=opt(),
            requests_finished=opt(),
            ttft=draw(histograms()),
            itl=draw(histograms()),
            e2e=draw(histograms()),
        )
        page[s.key] = s
    return page


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=-2.0, max_value=8.0, allow_nan=False), pages()),
        min_size=1,
        max_size=25,
    ),
    st.sampled_from([0.5, 3.0, 10.0]),
)
def test_incremental_report_is_derive_of_the_same_scrapes(
    pushes: list[tuple[float, dict[tuple[str, str], EngineSample]]], window_s: float
) -> None:
    w, at_s = SignalWindow(window_s), 0.0
    for step_s, page in pushes:
        at_s += step_s  # mostly forward; now and then the clock steps back
        w = w.push(at_s, page)
        assert w.report() == derive(w.scrapes)
        assert len(w.steps) == len(w.scrapes) - 1
        assert_shortcut_is_the_fold(w)


def assert_shortcut_is_the_fold(w: SignalWindow) -> None:
    """Newest minus oldest, where every step is exact, is the fold of the steps to the bit."""
    newest = w.scrapes[-1].engines
    for key in newest:
        mine = [s[key] for s in w.steps if key in s]
        oldest = w.scrapes[0].engines.get(key) if len(mine) == len(w.steps) else None
        for name in ("ttft", "itl", "e2e"):
            steps = [getattr(m, name) for m in mine]
            ends = (
                (None, None)
                if oldest is None
                else (getattr(oldest, name), getattr(newest[key], name))
            )
            assert _hist_window(steps, *ends) == _hist_increase(steps)


def test_a_window_built_by_hand_computes_its_steps() -> None:
    h = Histogram(((1.0, 1.0), (math.inf, 2.0)), count=2.0, sum_s=0.0)
    page = {("m", "0"): EngineSample("m", "0", generation_tokens=10.0, e2e=h)}
    w = SignalWindow(10.0).push(0.0, page).push(1.0, page)
    by_hand = SignalWindow(10.0, w.scrapes)
    assert by_hand.report() == w.report() == derive(w.scrapes)
    assert by_hand.push(2.0, page).report() == derive(by_hand.push(2.0, page).scrapes)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 50), min_size=4, max_size=4),
        min_size=1,
        max_size=25,
    ),
    st.integers(0, 30),
    st.sampled_from([0.5, 3.0]),
)
def test_growing_whole_histograms_take_the_shortcut_to_the_same_numbers(
    increments: list[list[int]], odd_one: int, step_s: float
) -> None:
    """What a live vLLM does: counts only grow, in whole numbers (now and then one page is
    fractional or missing, which must fall back to the fold)."""
    bounds, cum = (0.1, 0.5, 1.0, math.inf), [0.0, 0.0, 0.0, 0.0]
    w = SignalWindow(3.0)
    for i, inc in enumerate(increments):
        total = 0.0
        for b, n in enumerate(inc):
            total += n
            cum[b] += total
        counts = [c + 0.5 for c in cum] if i == odd_one else cum
        h = Histogram(tuple(zip(bounds, counts, strict=True)), count=counts[-1], sum_s=0.0)
        page = {} if i == odd_one + 1 else {("m", "0"): EngineSample("m", "0", ttft=h, e2e=h)}
        w = w.push(i * step_s, page or {("m", "1"): EngineSample("m", "1")})
        assert w.report() == derive(w.scrapes)
        assert_shortcut_is_the_fold(w)
