"""Seeded request streams for the twin: Poisson, bursty (two-state MMPP) and time-varying.

A workload is a recipe; `stream(server, seed)` gives the independent arrival stream of one
server (rates are per server). Every draw comes from a `random.Random` seeded from
(seed, server), so the same seed gives the same arrivals whatever the policy does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

RateFn = Callable[[float], float]  # requests/s per server as a function of virtual time (s)


@dataclass(frozen=True)
class Arrival:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthDist:
    """Lognormal token count with the given median, clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def draw(self, rng: random.Random) -> int:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.hi, max(self.lo, round(value))))


# Chat-like lengths (ShareGPT-ish): medians 384 in, 192 out.
DEFAULT_PROMPT = LengthDist(median=384, sigma=0.9, lo=16, hi=4096)
DEFAULT_OUTPUT = LengthDist(median=192, sigma=0.8, lo=8, hi=2048)


class ArrivalStream(Protocol):
    def next_arrival(self) -> Arrival:
        """The next request, arrival times non-decreasing. Infinite."""
        ...


class Workload(Protocol):
    def stream(self, server: int, seed: int) -> ArrivalStream: ...


def _rng(seed: int, server: int, salt: int) -> random.Random:
    return random.Random(seed * 1_000_003 + server * 7919 + salt)


class _RateStream:
    """Non-homogeneous Poisson by Ogata thinning against a running rate bound."""

    def __init__(self, rate: RateFn, rate_max: float, prompt: LengthDist, output: LengthDist,
                 rng: random.Random) -> None:
        self._rate = rate
        self._rate_max = rate_max
        self._prompt = prompt
        self._output = output
        self._rng = rng
        self._t = 0.0

    def next_arrival(self) -> Arrival:
        rng = self._rng
        while True:
            self._t += rng.expovariate(self._rate_max)
            r = self._rate(self._t)
            if r > self._rate_max:  # the bound was wrong: raise it and go on (rare)
                self._rate_max = r * 1.5
            if rng.random() * self._rate_max <= r:
                return Arrival(self._t, self._prompt.draw(rng), self._output.draw(rng))


@dataclass(frozen=True)
class PoissonWorkload:
    """Poisson arrivals at `rate_per_s` per server: a number, or a callable of virtual time.

    With a callable, give `rate_max_per_s` (an upper bound) or it is found by sampling.
    """

    rate_per_s: float | RateFn = 4.0
    prompt: LengthDist = DEFAULT_PROMPT
    output: LengthDist = DEFAULT_OUTPUT
    rate_max_per_s: float | None = None

    def rate_at(self, t_s: float) -> float:
        r = self.rate_per_s
        return float(r(t_s)) if callable(r) else float(r)

    def stream(self, server: int, seed: int) -> ArrivalStream:
        r = self.rate_per_s
        if callable(r):
            bound = self.rate_max_per_s or max(r(t) for t in range(0, 86400, 10)) * 1.2
            fn: RateFn = r
        else:
            bound = float(r)
            fn = lambda _t: bound  # noqa: E731
        bound = max(bound, 1e-6)
        return _RateStream(fn, bound, self.prompt, self.output, _rng(seed, server, 1))


def varying_rate(base_per_s: float, period_s: float = 600.0) -> RateFn:
    """The demo's load: a slow swell from 25% to 175% of base plus a 2x burst each period."""

    def rate(t_s: float) -> float:
        phase = (t_s % period_s) / period_s
        swell = 1.0 + 0.75 * math.sin(2 * math.pi * phase)
        burst = 2.0 if 0.70 <= phase < 0.78 else 1.0
        return base_per_s * swell * burst

    return rate


def VaryingWorkload(  # reads as a class at call sites, like the other workloads
    base_rate_per_s: float = 4.0,
    period_s: float = 600.0,
    prompt: LengthDist = DEFAULT_PROMPT,
    output: LengthDist = DEFAULT_OUTPUT,
) -> PoissonWorkload:
    return PoissonWorkload(
        varying_rate(base_rate_per_s, period_s), prompt, output, base_rate_per_s * 3.6
    )


class _BurstyStream:
    def __init__(self, w: BurstyWorkload, rng: random.Random) -> None:
        self._w = w
        self._rng = rng
        self._t = 0.0
        self._high = False
        self._switch_at = rng.expovariate(1.0 / w.low_mean_s)

    def next_arrival(self) -> Arrival:
        w, rng = self._w, self._rng
        while True:
            rate = w.high_rate_per_s if self._high else w.low_rate_per_s
            gap = rng.expovariate(rate) if rate > 0 else math.inf
            if self._t + gap < self._switch_at:
                self._t += gap
                return Arrival(self._t, w.prompt.draw(rng), w.output.draw(rng))
            # memoryless: drop the partial gap and redraw in the new state
            self._t = self._switch_at
            self._high = not self._high
            mean = w.high_mean_s if self._high else w.low_mean_s
            self._switch_at = self._t + rng.expovariate(1.0 / mean)


@dataclass(frozen=True)
class BurstyWorkload:
    """Two-state Markov-modulated Poisson: calm spells at low_rate, bursts at high_rate."""

    low_rate_per_s: float = 2.0
    high_rate_per_s: float = 10.0
    low_mean_s: float = 40.0
    high_mean_s: float = 10.0
    prompt: LengthDist = field(default=DEFAULT_PROMPT)
    output: LengthDist = field(default=DEFAULT_OUTPUT)

    @property
    def mean_rate_per_s(self) -> float:
        total = self.low_mean_s + self.high_mean_s
        return (self.low_rate_per_s * self.low_mean_s + self.high_rate_per_s * self.high_mean_s) / (
            total
        )

    def stream(self, server: int, seed: int) -> ArrivalStream:
        return _BurstyStream(self, _rng(seed, server, 2))


@dataclass(frozen=True)
class BacklogWorkload:
    """A deep backlog, every request arriving at t=0: for characterisation of a saturated
    server at a fixed batch limit (the server pulls at most `max_waiting` into its queue)."""

    prompt: LengthDist = DEFAULT_PROMPT
    output: LengthDist = DEFAULT_OUTPUT

    def stream(self, server: int, seed: int) -> ArrivalStream:
        rng = _rng(seed, server, 3)
        w = self

        class _Backlog:
            def next_arrival(self) -> Arrival:
                return Arrival(0.0, w.prompt.draw(rng), w.output.draw(rng))

        return _Backlog()
