"""The twin's shortcuts for the virtual-time runner change nothing it reads: a host without a
/metrics page scrapes, signals and accounts exactly as one with it, and the bisected sample
windows hold exactly the samples a walk over them would."""

from __future__ import annotations

import random
from collections import deque

import pytest

from palsd.sim.engine import TwinHost
from palsd.sim.records import TimedSamples
from palsd.sim.scenarios import PerServerWorkload
from palsd.sim.workload import BurstyWorkload, PoissonWorkload


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
