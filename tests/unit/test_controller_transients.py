"""Transients of the cap loop: a load feed-forward raise is taken back when the burst passes,
and SLO headroom that falls fast raises the cap before the window shows a miss. Plain values,
no twin, no mocks (issue 10's price gap and the mixed scenario's phase starts)."""

from __future__ import annotations

from palsd.core.controller import JointController, JointParams
from palsd.core.types import ServerSignals
from tests.unit.test_controller_fixtures import gpu, obs, server, signals


def _sig(itl_s: float = 0.045, running: float = 120) -> ServerSignals:
    """Chat at half load: 120 in flight, ITL under half its 100 ms target, TTFT far inside."""
    return signals(itl_s=itl_s, ttft_s=0.2, running=running, requests_per_s=15.0)


CALM = _sig()


class _Loop:
    """One server on two GPUs whose draw follows the limit the controller sets."""

    def __init__(self, params: JointParams | None = None, limit_w: float = 300.0) -> None:
        self.ctrl = JointController(params)
        self.limit_w = limit_w
        self.t = 0.0

    def tick(self, sig: ServerSignals) -> list[str]:
        self.t += 0.5
        gpus = [gpu(i, power_w=self.limit_w - 5.0, limit_w=self.limit_w) for i in (0, 1)]
        decision = self.ctrl.decide(obs(self.t, gpus, [server("s0", (0, 1), sig)]))
        self.limit_w = max(decision.power_limits_w.values())
        return list(decision.reasons)

    def run(self, sig: ServerSignals, seconds: float) -> list[str]:
        said: list[str] = []
        for _ in range(round(seconds / 0.5)):
            said += self.tick(sig)
        return said


def _settled(params: JointParams | None = None) -> _Loop:
    # A search that cannot move (equal tokens/J everywhere needs a full window per cap), so
    # the cap before the burst is simply where the loop starts.
    loop = _Loop(params or JointParams(high_margin=0.9), limit_w=300.0)
    loop.ctrl.decide(obs(0.0, [gpu(i, 295.0, limit_w=300.0) for i in (0, 1)], []))
    loop.run(CALM, 5.0)
    return loop


def test_a_load_step_raise_is_taken_back_once_the_burst_has_passed():
    loop = _settled(JointParams(high_margin=0.5))
    before = loop.limit_w
    burst = _sig(running=480)
    said = loop.run(burst, 3.0)
    assert any("feed-forward" in r for r in said), said
    raised = loop.limit_w
    assert raised >= before + JointParams().cap_step_up_w
    # The burst is over and the latency has ample room again: the cap goes straight back
    # once the smoothed concurrency has come down (a few seconds), not down one search step
    # per 10 s window.
    said = loop.run(CALM, 6.0)
    assert any("feed-forward undone" in r for r in said), said
    assert loop.limit_w == before


def test_a_load_step_the_headroom_absorbs_raises_nothing():
    # Twice the concurrency at 55% ITL headroom: were the latency to grow in proportion, it
    # would reach 90% of its target, inside it. The thin-headroom rule answers if it comes
    # to that; a feed-forward raise here would only spend power on a burst that fits.
    loop = _settled(JointParams(high_margin=0.5))
    before = loop.limit_w
    said = loop.run(_sig(running=240), 5.0)
    assert not any("feed-forward" in r for r in said), said
    assert loop.limit_w == before


def test_a_larger_load_step_raises_more():
    raised = []
    for running in (480, 960):
        loop = _settled(JointParams(high_margin=0.5))
        before = loop.limit_w
        said = loop.run(_sig(running=running), 5.0)
        assert any("load step" in r for r in said), said
        raised.append(loop.limit_w - before)
    assert 0 < raised[0] < raised[1], raised


def test_no_load_step_while_the_concurrency_is_falling():
    # The burst's feed-forward set the cap (and its reference) early in the rise; as the
    # burst passes, the smoothed concurrency stays above that reference for a few seconds,
    # but it is falling: no raise for it (without the rule: 325 -> 364 W at the first tick).
    loop = _settled(JointParams(high_margin=0.5))
    said = loop.run(_sig(running=480), 3.0)
    assert any("load step" in r for r in said), said
    said = loop.run(CALM, 6.0)
    assert not any("load step" in r for r in said), said


def test_a_raise_the_latency_asked_for_is_not_taken_back():
    loop = _settled(JointParams(high_margin=0.5))
    before = loop.limit_w
    loop.run(_sig(running=480), 5.0)
    # During the burst the ITL misses its target: the SLO raised the cap on top of the
    # feed-forward, so the pre-burst cap is no longer known to be enough.
    loop.run(_sig(running=480, itl_s=0.12), 3.5)
    missed_at = loop.limit_w
    said = loop.run(CALM, 4.0)
    assert not any("feed-forward undone" in r for r in said), said
    assert loop.limit_w > before
    assert loop.limit_w >= missed_at - JointParams().cap_step_w * 2


def test_no_undo_while_the_latency_headroom_is_not_ample():
    loop = _settled(JointParams(high_margin=0.5))
    before = loop.limit_w
    loop.run(_sig(running=480), 5.0)
    # Load back, but ITL at 60 ms: 40% headroom, below the 50% a lowering needs.
    said = loop.run(_sig(itl_s=0.06), 4.0)
    assert not any("feed-forward undone" in r for r in said), said
    assert loop.limit_w > before


def test_headroom_falling_fast_raises_before_the_window_shows_a_miss():
    loop = _settled()
    before = loop.limit_w
    # ITL climbs from 45 to 85 ms within a second (+55% to +15% headroom): still within the
    # target, and above low_margin's thin-headroom raise for the first tick.
    said = loop.tick(_sig(itl_s=0.06))
    said += loop.tick(_sig(itl_s=0.085))
    assert any("falling fast" in r for r in said), said
    assert loop.limit_w > before + 100.0


def test_slowly_drifting_headroom_is_not_a_fall():
    loop = _settled()
    said: list[str] = []
    # The same 40 ms rise spread over 20 s: the window's ordinary drift.
    for k in range(40):
        said += loop.tick(_sig(itl_s=0.045 + 0.001 * k))
    assert not any("falling fast" in r for r in said), said


def _at_the_ceiling_with_itl(itl_s: float) -> list[str]:
    # Both GPUs at their 700 W maximum (no watts to spare), 180 of 256 running, none waiting.
    ctrl = JointController(JointParams(initial_batch_limit=None))
    said: list[str] = []
    for k in range(1, 9):
        gpus = [gpu(i, power_w=695.0, limit_w=700.0) for i in (0, 1)]
        sig = signals(itl_s=itl_s, ttft_s=0.2, running=180, requests_per_s=15.0)
        srv = server("s0", (0, 1), sig, batch_limit=256)
        said += ctrl.decide(obs(0.5 * k, gpus, [srv])).reasons
    return said


def test_a_marginal_itl_miss_at_the_ceiling_does_not_shrink_the_batch():
    # ITL 10% over target for a few seconds: a shrink would queue requests on a saturated
    # server (TTFT falls off a cliff) to fix what the next window usually does not show.
    said = _at_the_ceiling_with_itl(0.11)
    assert not any("batch limit 256 ->" in r for r in said), said


def test_a_clear_itl_miss_at_the_ceiling_shrinks_the_batch():
    said = _at_the_ceiling_with_itl(0.14)
    assert any("batch limit 256 ->" in r and "no watts to spare" in r for r in said), said
