"""What a simulated server remembers: vLLM-style histograms and counters since start, and
time-stamped samples over a retention horizon for windowed signals and SLO accounting."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
ITERATION_TOKEN_BUCKETS = tuple(
    float(1 << i) if i == 0 else float(8 << (i - 1)) for i in range(0, 13)
)  # 1 8 16 32 ... 16384


def one_two_five(max_value: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to max_model_len for token-count histograms."""
    out: list[float] = []
    mantissa, exponent = [1, 2, 5], 0
    while True:
        for m in mantissa:
            v = m * 10**exponent
            if v > max_value:
                return tuple(out)
            out.append(float(v))
        exponent += 1


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * (len(bounds) + 1)  # last slot: +Inf only
        self.sum = 0.0

    def observe(self, value: float, weight: float = 1.0) -> None:
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight

    @property
    def count(self) -> float:
        return sum(self.counts)


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, in virtual seconds."""

    server: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    preemptions: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (vLLM's time_per_output_token)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


def weighted_quantiles(
    samples: list[tuple[float, float]], qs: tuple[float, ...]
) -> list[float | None]:
    """The qs-quantiles (ascending) of (value, weight) samples, with one sort: for each q the
    first sample, in value order, at which the running weight reaches q of the total. Weights
    are whole numbers >= 0 (token counts, 1 per request)."""
    if not samples:
        return [None] * len(qs)
    # Sorted by value alone (floats compare several times faster than tuples). The order of
    # equal values cannot matter: whole weights add up exactly in any order, so the running
    # weight at the end of each run of equal values is the same.
    ordered = sorted(samples, key=itemgetter(0))
    weights = [w for _, w in ordered]
    total = sum(weights)
    if total <= 0:
        return [None] * len(qs)
    # The running sums, added left to right as a walk over the samples would, searched by
    # bisection (they never fall: weights are >= 0) instead of walked.
    running = list(accumulate(weights))
    last = len(ordered) - 1
    out: list[float | None] = []
    i = 0
    for q in qs:
        i = bisect_left(running, q * total, i, last)
        out.append(ordered[i][0])
    return out


def weighted_quantile(samples: list[tuple[float, float]], q: float) -> float | None:
    """q-quantile of (value, weight) samples; None when empty."""
    return weighted_quantiles(samples, (q,))[0]


class TimedSamples:
    """(t, value, weight) samples kept for `horizon_s`; queried by time window. Samples are
    added in time order (a server's clock only moves forward), so a window is found by
    bisection instead of a walk over every sample in it."""

    __slots__ = ("_samples", "_times", "horizon_s")

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self._times: list[float] = []
        self._samples: list[tuple[float, float]] = []  # (value, weight), as _times

    def add(self, t_s: float, value: float, weight: float = 1.0) -> None:
        times = self._times
        times.append(t_s)
        self._samples.append((value, weight))
        if times[0] < t_s - self.horizon_s - 60.0:  # prune in batches, not on every add
            old = bisect_left(times, t_s - self.horizon_s)
            del times[:old]
            del self._samples[:old]

    def window(self, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        """(value, weight) of the samples with t0_s <= t <= t1_s, oldest first."""
        times = self._times
        return self._samples[bisect_left(times, t0_s) : bisect_right(times, t1_s)]
