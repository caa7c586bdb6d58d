"""The free-power rule (safety.raise_into_free_power) and the overshoot reading it rests on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.core.safety import (
    drawn_power_w,
    excursion_w,
    power_committed_w,
    raise_into_free_power,
)
from palsd.core.types import GpuObservation


def g(
    index: int,
    limit_w: float,
    instant_w: float | None,
    avg_w: float | None = None,
) -> GpuObservation:
    return GpuObservation(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index}",
        power_w=avg_w if avg_w is not None else instant_w,
        power_instant_w=instant_w,
        energy_j=None,
        power_limit_w=limit_w,
        enforced_limit_w=limit_w,
        min_limit_w=200.0,
        max_limit_w=700.0,
        default_limit_w=700.0,
    )


def test_drawn_power_prefers_instant_then_average_then_the_limit() -> None:
    assert drawn_power_w(g(0, 400.0, 350.0, avg_w=300.0)) == 350.0
    assert drawn_power_w(g(0, 400.0, None, avg_w=300.0)) == 300.0
    assert drawn_power_w(g(0, 400.0, None, None)) == 400.0  # failed read: counts at its limit


def test_a_raise_waits_while_the_lowered_gpu_still_draws_its_old_power() -> None:
    # GPU 0 was just lowered 500 -> 300 W but still draws 480 W; GPU 1 wants 300 -> 500 W.
    gpus = [g(0, 500.0, 480.0), g(1, 300.0, 290.0)]
    out = raise_into_free_power({0: 300.0, 1: 500.0}, gpus, budget_w=780.0)
    assert out == {0: 300.0, 1: 300.0}  # the lowering goes through, the raise waits
    # Next tick the lowered GPU has come down: now the raise may take the freed watts.
    gpus = [g(0, 300.0, 295.0), g(1, 300.0, 290.0)]
    assert raise_into_free_power({0: 300.0, 1: 500.0}, gpus, budget_w=780.0) == {
        0: 300.0,
        1: 480.0,
    }


def test_part_of_a_raise_is_granted_when_part_of_the_power_is_free() -> None:
    gpus = [g(0, 500.0, 400.0), g(1, 300.0, 290.0)]
    out = raise_into_free_power({0: 300.0, 1: 500.0}, gpus, budget_w=800.0)
    assert out == {0: 300.0, 1: 400.0}  # 800 - max(300, 400) = 400 W free for GPU 1


def test_lowerings_holds_and_missing_targets_pass_and_no_budget_means_no_rule() -> None:
    gpus = [g(0, 500.0, 480.0), g(1, 300.0, 290.0), g(2, 250.0, None, None)]
    assert raise_into_free_power({0: 450.0}, gpus, budget_w=100.0) == {0: 450.0, 1: 300.0, 2: 250.0}
    assert raise_into_free_power({1: 700.0}, gpus, None)[1] == 700.0


def test_excursion_is_the_drawn_power_above_the_sum_of_limits() -> None:
    assert excursion_w([g(0, 300.0, 450.0), g(1, 300.0, 250.0)]) == 100.0
    assert excursion_w([g(0, 300.0, 250.0), g(1, 300.0, 250.0)]) == 0.0


reading = st.one_of(st.none(), st.floats(50.0, 900.0))


@st.composite
def host(draw: st.DrawFn) -> tuple[list[GpuObservation], dict[int, float], float]:
    n = draw(st.integers(1, 8))
    gpus = [g(i, draw(st.floats(200.0, 700.0)), draw(reading), draw(reading)) for i in range(n)]
    targets = {i: draw(st.floats(200.0, 700.0)) for i in range(n) if draw(st.booleans()) or i == 0}
    return gpus, targets, draw(st.floats(0.0, 8 * 700.0))


@settings(max_examples=500, deadline=None)
@given(host())
def test_raises_only_ever_use_power_that_is_free(
    case: tuple[list[GpuObservation], dict[int, float], float],
) -> None:
    gpus, targets, budget_w = case
    out = raise_into_free_power(targets, gpus, budget_w)
    assert set(out) == {x.index for x in gpus}
    raised = False
    for x in gpus:
        want = targets.get(x.index, x.power_limit_w)
        # Never above the target; a lowering or a hold passes unchanged; a raise never turns
        # into a lowering.
        assert out[x.index] <= want + 1e-9
        if want <= x.power_limit_w:
            assert out[x.index] == want
        else:
            assert out[x.index] >= x.power_limit_w
            raised = raised or out[x.index] > x.power_limit_w
    if raised:
        assert power_committed_w(out, gpus) <= budget_w + 1e-6


@settings(max_examples=300, deadline=None)
@given(host())
def test_with_every_gpu_at_or_under_its_limit_and_room_every_raise_is_granted(
    case: tuple[list[GpuObservation], dict[int, float], float],
) -> None:
    gpus, targets, _ = case
    quiet = [g(x.index, x.power_limit_w, x.power_limit_w * 0.5) for x in gpus]
    budget_w = sum(max(targets.get(x.index, x.power_limit_w), x.power_limit_w) for x in quiet)
    out = raise_into_free_power(targets, quiet, budget_w)
    for x in quiet:
        # Granted raises are floored to a milliwatt (NVML's unit): up to 1 mW under the
        # target, plus the float error of that floor (200.599 for 200.60000000000002).
        want = targets.get(x.index, x.power_limit_w)
        assert want - 1e-3 - 1e-9 <= out[x.index] <= want + 1e-9
