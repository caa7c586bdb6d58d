"""The twin's shortcuts for the virtual-time runner change nothing it reads: a host without a
/metrics page scrapes, signals and accounts exactly as one with it, the bisected sample
windows hold exactly the samples a walk over them would, their quantiles found by bisection are
the ones the walk found, and replayed arrivals are the ones a fresh stream draws."""

from __future__ import annotations

import random
from collections import deque

import pytest

from palsd.sim.engine import TwinHost
from palsd.sim.records import TimedSamples, weighted_quantiles
from palsd.sim.scenarios import MODELS, PerServerWorkload, build_host, build_scenario
from palsd.sim.workload import (
    Arrival,
    ArrivalStream,
    BurstyWorkload,
    PoissonWorkload,
    RecordedWorkload,
)


def _host(metrics_page: bool) -> TwinHost:
    workload = PerServerWorkload((PoissonWorkload(12.0), BurstyWorkload(8.0, 20.0, 20.0, 5.0)))
    return TwinHost(
        model="qwen-moe", n_gpus=2, tp=1, workload=workload, seed=3, metrics_page=metrics_page
    )


def test_a_host_without_a_page_runs_and_reads_exactly_as_one_with_it() -> None:
    paged, lean = _host(True), _host(False)
    for h in (paged, lean):
        h.set_power_limit_w(0, 300.0)  # one GPU under its cap loop, one free
        h.set_batch_limit(1, 16)  # one server held back by its batch limit
        h.step(90.0)
    assert lean.energy_j_total() == paged.energy_j_total()
    assert lean.power_totals_w() == paged.power_totals_w()
    for server in range(2):
        assert lean.scrape(server) == paged.scrape(server)
        assert lean.server_signals(server, 10.0) == paged.server_signals(server, 10.0)
        assert lean.request_records(server) == paged.request_records(server)
    assert "vllm:request_queue_time_seconds_bucket" in paged.metrics_text(0)
    with pytest.raises(RuntimeError, match="metrics_page"):
        lean.metrics_text(0)


class _WalkedSamples:
    """The previous TimedSamples: a deque walked back from its newest sample."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self.items: deque[tuple[float, float, float]] = deque()

    def add(self, t_s: float, value: float, weight: float) -> None:
        self.items.append((t_s, value, weight))
        if self.items[0][0] < t_s - self.horizon_s - 60.0:
            while self.items and self.items[0][0] < t_s - self.horizon_s:
                self.items.popleft()

    def window(self, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        out = []
        for t, v, w in reversed(self.items):
            if t < t0_s:
                break
            if t <= t1_s:
                out.append((v, w))
        return out


def test_a_window_of_timed_samples_is_the_samples_a_walk_finds() -> None:
    rng = random.Random(5)
    samples, walked = TimedSamples(horizon_s=30.0), _WalkedSamples(30.0)
    t = 0.0
    for _ in range(5000):
        t += rng.choice((0.0, rng.expovariate(20.0)))  # ties too
        value, weight = rng.random(), float(rng.randint(1, 8))
        samples.add(t, value, weight)
        walked.add(t, value, weight)
        if rng.random() < 0.05:
            t0, t1 = t - rng.uniform(0.0, 120.0), t + rng.uniform(-2.0, 1.0)
            assert samples.window(t0, t1) == walked.window(t0, t1)[::-1]  # oldest first


def _walked_quantiles(
    samples: list[tuple[float, float]], qs: tuple[float, ...]
) -> list[float | None]:
    """The previous weighted_quantiles: a walk that adds the weights up as it goes, over the
    samples sorted as tuples (equal values by weight)."""
    if not samples:
        return [None] * len(qs)
    ordered = sorted(samples)
    total = sum(w for _, w in ordered)
    if total <= 0:
        return [None] * len(qs)
    out: list[float | None] = []
    acc = 0.0
    i = 0
    for q in qs:
        target = q * total
        while i < len(ordered) - 1 and acc + ordered[i][1] < target:
            acc += ordered[i][1]
            i += 1
        out.append(ordered[i][0])
    return out


def test_weighted_quantiles_by_bisection_are_the_walks() -> None:
    rng = random.Random(9)
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    for _ in range(3000):
        n = rng.randint(0, 40)
        values = [rng.choice((0.1, 0.2, rng.random())) for _ in range(n)]  # ties too
        weights = [rng.choice((0.0, 1.0, rng.randint(1, 256))) for _ in values]  # whole
        samples = list(zip(values, weights, strict=True))
        assert weighted_quantiles(samples, qs) == _walked_quantiles(samples, qs)


def _drain(stream: ArrivalStream, rng: random.Random, end_s: float) -> list[Arrival]:
    """Every arrival up to end_s, asked for with random horizons (as a server's steps do)."""
    out: list[Arrival] = []
    t = 0.0
    while t < end_s:
        t = min(end_s, t + rng.choice((0.01, 0.1, 1.0, 7.0)))
        while (nxt := stream.peek(t)) is not None:
            assert stream.pop() is nxt
            out.append(nxt)
    return out


def test_a_recorded_workload_replays_the_arrivals_a_fresh_stream_draws() -> None:
    workload = PerServerWorkload((PoissonWorkload(12.0), BurstyWorkload(8.0, 20.0, 20.0, 5.0)))
    recorded = RecordedWorkload(workload)
    rng = random.Random(2)
    for server in (0, 1):
        fresh = _drain(workload.stream(server, 4), rng, 300.0)
        first = recorded.stream(server, 4)
        assert _drain(first, rng, 120.0) == [a for a in fresh if a.arrival_s <= 120.0]
        # a second replay reads what the first recorded and draws the rest; the first goes on
        assert _drain(recorded.stream(server, 4), rng, 300.0) == fresh
        assert _drain(first, rng, 300.0) == [a for a in fresh if a.arrival_s > 120.0]
    with pytest.raises(LookupError):
        recorded.stream(0, 4).pop()


def test_the_runner_builds_every_host_of_a_scenario_on_one_recording() -> None:
    setup, scenario = MODELS["qwen-moe"], build_scenario("mixed", 1)
    a, b = (build_host(setup, build_scenario("mixed", 1), 1, "h100", 600.0) for _ in range(2))
    assert a.workload is b.workload  # equal recipes: the arrivals are drawn once
    other_seed = build_host(setup, scenario, 2, "h100", 600.0)
    assert other_seed.workload is a.workload  # the seed picks the streams within it
    assert build_host(setup, scenario, 1, "h100", 300.0).workload is not a.workload
