"""Seeded request streams for the twin: Poisson, bursty (two-state MMPP) and time-varying.

A workload is a recipe; `stream(server, seed)` gives the independent arrival stream of one
server (rates are per server). Every draw comes from a `random.Random` seeded from
(seed, server), so the same seed gives the same arrivals whatever the policy does.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple, Protocol

RateFn = Callable[[float], float]  # requests/s per server as a function of virtual time (s)


class Arrival(NamedTuple):
    """One request's arrival (a named tuple: one is made per request, a frozen dataclass costs
    several times as much to build)."""

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

    @cached_property
    def mu(self) -> float:
        """log(median), worked out once: draw() runs twice per request."""
        return math.log(self.median)

    def draw(self, rng: random.Random) -> int:
        # rng.lognormvariate(mu, sigma) is exp(rng.normalvariate(mu, sigma)): the same draw
        value = round(math.exp(rng.normalvariate(self.mu, self.sigma)))
        return int(self.hi if value > self.hi else (self.lo if value < self.lo else value))


# Chat-like lengths (ShareGPT-ish): medians 384 in, 192 out.
DEFAULT_PROMPT = LengthDist(median=384, sigma=0.9, lo=16, hi=4096)
DEFAULT_OUTPUT = LengthDist(median=192, sigma=0.8, lo=8, hi=2048)
# Long-prompt, prefill-heavy traffic (summarisation, RAG): medians 3000 in, 96 out.
LONG_PROMPT = LengthDist(median=3000, sigma=0.4, lo=512, hi=8000)
LONG_OUTPUT = LengthDist(median=96, sigma=0.6, lo=8, hi=1024)


class ArrivalStream(Protocol):
    """Arrivals in time order, generated lazily so a rate may drop to zero for good."""

    def peek(self, until_s: float) -> Arrival | None:
        """The next arrival if it comes at or before until_s (not consumed), else None."""
        ...

    def pop(self) -> Arrival:
        """Consume the arrival the last `peek` returned."""
        ...


class Workload(Protocol):
    def stream(self, server: int, seed: int) -> ArrivalStream: ...


def _rng(seed: int, server: int, salt: int) -> random.Random:
    return random.Random(seed * 1_000_003 + server * 7919 + salt)


class _LazyStream:
    """Holds the one arrival generated ahead; subclasses generate up to a horizon. The order
    of random draws does not depend on the horizons asked for, so any step size gives the
    same arrivals."""

    def __init__(self) -> None:
        self._pending: Arrival | None = None

    def _generate(self, until_s: float) -> Arrival | None:
        raise NotImplementedError

    def peek(self, until_s: float) -> Arrival | None:
        if self._pending is None:
            self._pending = self._generate(until_s)
        pending = self._pending
        return pending if pending is not None and pending.arrival_s <= until_s else None

    def pop(self) -> Arrival:
        pending = self._pending
        if pending is None:
            raise LookupError("pop() without a peeked arrival")
        self._pending = None
        return pending


class _Recording:
    """One stream's arrivals in the order it generated them, kept in arrays (24 bytes an
    arrival, a third of an Arrival's size) and extended on demand."""

    def __init__(self, source: ArrivalStream) -> None:
        self._source = source
        self.times_s = array("d")
        self.prompts = array("q")
        self.outputs = array("q")

    def extend(self, until_s: float) -> bool:
        """Take the source's next arrival if it comes at or before until_s; whether it did."""
        nxt = self._source.peek(until_s)
        if nxt is None:
            return False
        self._source.pop()
        self.times_s.append(nxt.arrival_s)
        self.prompts.append(nxt.prompt_tokens)
        self.outputs.append(nxt.output_tokens)
        return True


class _Replay:
    """An ArrivalStream reading a recording from its start, extending it at its end."""

    def __init__(self, recording: _Recording) -> None:
        self._rec = recording
        self._i = 0  # the next arrival's position in the recording
        self._next: Arrival | None = None

    def peek(self, until_s: float) -> Arrival | None:
        nxt = self._next
        if nxt is None:
            rec, i = self._rec, self._i
            if i == len(rec.times_s) and not rec.extend(until_s):
                return None
            nxt = self._next = Arrival(rec.times_s[i], rec.prompts[i], rec.outputs[i])
        return nxt if nxt.arrival_s <= until_s else None

    def pop(self) -> Arrival:
        nxt = self._next
        if nxt is None:
            raise LookupError("pop() without a peeked arrival")
        self._next = None
        self._i += 1
        return nxt


class RecordedWorkload:
    """A workload whose streams are generated once and replayed: each `stream(server, seed)`
    gives the same arrivals as a fresh stream of `workload` (random draws are per stream and
    do not depend on the horizons asked for), but only the first one for a (server, seed)
    draws them. The virtual-time runner builds the same host for every policy of a scenario;
    drawing the arrivals was ~10% of each run."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._recordings: dict[tuple[int, int], _Recording] = {}

    def stream(self, server: int, seed: int) -> ArrivalStream:
        rec = self._recordings.get((server, seed))
        if rec is None:
            rec = self._recordings[(server, seed)] = _Recording(self.workload.stream(server, seed))
        return _Replay(rec)


class _RateStream(_LazyStream):
    """Non-homogeneous Poisson by thinning against a rate bound (Lewis-Shedler)."""

    def __init__(
        self,
        rate: RateFn,
        rate_max: float,
        prompt: LengthDist,
        output: LengthDist,
        rng: random.Random,
    ) -> None:
        super().__init__()
        self._rate = rate
        self._rate_max = rate_max
        self._prompt = prompt
        self._output = output
        self._rng = rng
        self._candidate = rng.expovariate(rate_max)

    def _generate(self, until_s: float) -> Arrival | None:
        rng = self._rng
        while self._candidate <= until_s:
            t = self._candidate
            self._candidate = t + rng.expovariate(self._rate_max)
            r = self._rate(t)
            if r > self._rate_max:  # the bound was wrong: raise it (rare; keeps going)
                self._rate_max = r * 1.5
            if rng.random() * self._rate_max <= r:
                return Arrival(t, self._prompt.draw(rng), self._output.draw(rng))
        return None


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


class _BurstyStream(_LazyStream):
    def __init__(self, w: BurstyWorkload, rng: random.Random) -> None:
        super().__init__()
        self._w = w
        self._rng = rng
        self._high = False
        self._switch_at = rng.expovariate(1.0 / w.low_mean_s)
        self._candidate = self._draw_gap(0.0)

    def _draw_gap(self, t: float) -> float:
        rate = self._w.high_rate_per_s if self._high else self._w.low_rate_per_s
        return t + self._rng.expovariate(rate) if rate > 0 else math.inf

    def _generate(self, until_s: float) -> Arrival | None:
        w, rng = self._w, self._rng
        while min(self._candidate, self._switch_at) <= until_s:
            if self._candidate < self._switch_at:
                t = self._candidate
                self._candidate = self._draw_gap(t)
                return Arrival(t, w.prompt.draw(rng), w.output.draw(rng))
            # memoryless: drop the partial gap and redraw in the new state
            t = self._switch_at
            self._high = not self._high
            mean = w.high_mean_s if self._high else w.low_mean_s
            self._switch_at = t + rng.expovariate(1.0 / mean)
            self._candidate = self._draw_gap(t)
        return None


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
        return _BacklogStream(self, _rng(seed, server, 3))


class _BacklogStream(_LazyStream):
    def __init__(self, w: BacklogWorkload, rng: random.Random) -> None:
        super().__init__()
        self._w = w
        self._rng = rng

    def _generate(self, until_s: float) -> Arrival | None:
        return Arrival(0.0, self._w.prompt.draw(self._rng), self._w.output.draw(self._rng))


class _MixedStream(_LazyStream):
    """Thinning against a bound, with the request class drawn per arrival by the long-prompt
    share at that time, and an optional two-state burst modulation (its own seeded schedule,
    so the bursts do not depend on the arrivals)."""

    def __init__(self, w: MixedWorkload, rng: random.Random, burst_rng: random.Random) -> None:
        super().__init__()
        self._w = w
        self._rng = rng
        self._burst_rng = burst_rng
        self._candidate = rng.expovariate(w.rate_max_per_s)
        self._high = False
        self._switch_at = 0.0
        if w.bursts is not None:
            self._switch_at = burst_rng.expovariate(1.0 / w.bursts[2])

    def _burst(self, t: float) -> float:
        b = self._w.bursts
        if b is None:
            return 1.0
        low, high, low_s, high_s = b
        while t >= self._switch_at:
            self._high = not self._high
            self._switch_at += self._burst_rng.expovariate(1.0 / (high_s if self._high else low_s))
        return high if self._high else low

    def _generate(self, until_s: float) -> Arrival | None:
        w, rng = self._w, self._rng
        while self._candidate <= until_s:
            t = self._candidate
            self._candidate = t + rng.expovariate(w.rate_max_per_s)
            r = w.rate_per_s(t) * self._burst(t)
            if rng.random() * w.rate_max_per_s <= r:
                long = rng.random() < w.long_share(t)
                prompt, output = (w.long_prompt, w.long_output) if long else (w.prompt, w.output)
                return Arrival(t, prompt.draw(rng), output.draw(rng))
        return None


def _no_long(_t: float) -> float:
    return 0.0


@dataclass(frozen=True)
class MixedWorkload:
    """Poisson arrivals at `rate_per_s(t)` (bounded by `rate_max_per_s`), each request chat-like
    or long-prompt by `long_share(t)`, optionally burst-modulated: bursts = (low multiplier,
    high multiplier, mean low spell s, mean high spell s)."""

    rate_per_s: RateFn
    rate_max_per_s: float
    long_share: RateFn = _no_long
    bursts: tuple[float, float, float, float] | None = None
    prompt: LengthDist = DEFAULT_PROMPT
    output: LengthDist = DEFAULT_OUTPUT
    long_prompt: LengthDist = LONG_PROMPT
    long_output: LengthDist = LONG_OUTPUT

    def stream(self, server: int, seed: int) -> ArrivalStream:
        return _MixedStream(self, _rng(seed, server, 4), _rng(seed, server, 5))
