"""The incremental window (steps kept from push to push) reports exactly what `derive` computes
from the same scrapes from scratch: equal to the last bit, whatever the pushes do (engines
coming and going, counters and histograms resetting, bounds changing, the clock stepping back,
scrapes sparser than the window)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.sense.signals import SignalWindow, derive
from palsd.sense.vllm_metrics import EngineSample, Histogram

BOUNDS = ((0.1, 0.5, 1.0), (0.1, 0.2, 0.5, 1.0))
counts = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@st.composite
def histograms(draw: st.DrawFn) -> Histogram | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    bounds = (*draw(st.sampled_from(BOUNDS)), math.inf)
    cum, total = [], 0.0
    for _ in bounds:
        total += draw(st.floats(min_value=0, max_value=1e4, allow_nan=False))
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


def test_a_window_built_by_hand_computes_its_steps() -> None:
    h = Histogram(((1.0, 1.0), (math.inf, 2.0)), count=2.0, sum_s=0.0)
    page = {("m", "0"): EngineSample("m", "0", generation_tokens=10.0, e2e=h)}
    w = SignalWindow(10.0).push(0.0, page).push(1.0, page)
    by_hand = SignalWindow(10.0, w.scrapes)
    assert by_hand.report() == w.report() == derive(w.scrapes)
    assert by_hand.push(2.0, page).report() == derive(by_hand.push(2.0, page).scrapes)
