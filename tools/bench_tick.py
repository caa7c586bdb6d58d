"""Benchmark: CPU cost of one control tick for 8 GPUs and 8 servers.

Measures (1) the pure decision (controller + safety rules) and (2) a whole daemon tick
(sense over in-memory ports, decide, order writes, act, report metrics and the decision log),
each as CPU time per tick. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

from palsd.act.batch_actuator import BatchActuator
from palsd.act.memory import MemoryBatchPort
from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.core.budget import BudgetBook
from palsd.core.controller import JointController
from palsd.core.safety import fit_to_budget, order_writes
from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    GpuObservation,
    Observation,
    Quantiles,
    ServerObservation,
    ServerSignals,
    Slo,
)
from palsd.report.logs import configure_logging, get_logger
from palsd.report.metrics import Metrics
from palsd.runtime.daemon import Daemon, ServerLink
from palsd.sense.scraper import ServerScraper

N = 8
SLO = Slo(ttft_s=2.0, itl_s=0.1)


def gpu(i: int, rng: random.Random, limit_w: float = 700.0) -> GpuObservation:
    p = rng.uniform(250, 650)
    return GpuObservation(i, "H100", f"GPU-{i}", p, p, 1e6, limit_w, limit_w, 200, 700, 700)


def signals(rng: random.Random) -> ServerSignals:
    q = Quantiles(rng.uniform(0.01, 0.05), rng.uniform(0.05, 0.09), rng.uniform(0.08, 0.2))
    return ServerSignals(
        running=rng.uniform(10, 60),
        waiting=rng.uniform(0, 20),
        kv_cache_usage=0.5,
        requests_per_s=5,
        prompt_tokens_per_s=2000,
        generation_tokens_per_s=rng.uniform(500, 3000),
        preemptions_per_s=0,
        ttft_s=Quantiles(0.2, 0.8, 1.5),
        itl_s=q,
        e2e_s=Quantiles(5, 9, 12),
        window_s=10,
    )


def bench_decide(ticks: int) -> list[float]:
    rng = random.Random(1)
    ctl = JointController()
    gpus = tuple(gpu(i, rng) for i in range(N))
    costs = []
    for t in range(ticks):
        servers = tuple(
            ServerObservation(f"s{i}", f"http://s{i}", (i,), SLO, signals(rng), 64, 256)
            for i in range(N)
        )
        obs = Observation(t * 0.5, gpus, servers, BudgetInForce(3000, BudgetSource.DEFAULT))
        start = time.process_time()
        d = ctl.decide(obs)
        fitted = fit_to_budget(d.power_limits_w, gpus, 3000)
        order_writes({g.index: g.power_limit_w for g in gpus}, fitted.limits_w)
        costs.append(time.process_time() - start)
        gpus = tuple(replace(g, power_limit_w=fitted.limits_w[g.index]) for g in gpus)
    return costs


class Host:
    name = "memory"

    def __init__(self) -> None:
        self.rng = random.Random(2)
        self.gpus = {i: gpu(i, self.rng) for i in range(N)}

    def read_all(self) -> list[GpuObservation]:
        return [replace(g, power_w=self.rng.uniform(250, 650)) for g in self.gpus.values()]

    def set_power_limit_w(self, index: int, watts: float) -> None:
        self.gpus[index] = replace(self.gpus[index], power_limit_w=watts)

    def close(self) -> None:
        pass


class Signals:
    url = "http://memory/metrics"
    stale_reason = None

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    async def poll(self, now_s: float) -> ServerSignals:
        return signals(self.rng)


async def bench_tick(ticks: int, state_dir: Path) -> list[float]:
    """The tick alone: scrapes and batch-limit calls are tasks of their own in the daemon, so
    here each server is scraped and read once beforehand, and the tick reads what they hold."""
    configure_logging("info", "json", stream=io.StringIO())
    log = get_logger()
    host = Host()
    metrics = Metrics()
    actuator = PowerActuator(host, OriginalsStore(state_dir), metrics, log, False)
    links = [
        ServerLink(
            f"s{i}",
            f"http://s{i}",
            (i,),
            SLO,
            ServerScraper(Signals(i), 60.0),
            BatchActuator(
                f"s{i}",
                f"http://s{i}",
                MemoryBatchPort(64, 256),
                log=log,
                metrics=metrics,
                record_original=actuator.record_server,
                dry_run=False,
                poll_s=60.0,
            ),
        )
        for i in range(N)
    ]
    for link in links:
        await link.scraper.scrape()
        await link.batch.step()
    daemon = Daemon(
        backend=host,
        actuator=actuator,
        controller=JointController(),
        servers=links,
        book=BudgetBook(default_w=3000),
        metrics=metrics,
        log=log,
        period_s=60.0,
    )
    costs = []
    for _ in range(ticks):
        start = time.process_time()
        await daemon.tick()
        costs.append(time.process_time() - start)
    return costs


def summary(costs: list[float]) -> dict[str, float]:
    ordered = sorted(costs)
    return {
        "median_ms": round(statistics.median(costs) * 1e3, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e3, 3),
    }


def main() -> int:
    ticks = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    decide = summary(bench_decide(ticks))
    with TemporaryDirectory() as tmp:
        tick = summary(asyncio.run(bench_tick(ticks // 4, Path(tmp))))
    print(f"{'what (8 GPUs, 8 servers)':40} {'median CPU':>12} {'p99 CPU':>12}", file=sys.stderr)
    print(
        f"{'decide (JointController + safety)':40} {decide['median_ms']:>10} ms"
        f" {decide['p99_ms']:>10} ms",
        file=sys.stderr,
    )
    print(
        f"{'whole daemon tick (in-memory ports)':40} {tick['median_ms']:>10} ms"
        f" {tick['p99_ms']:>10} ms",
        file=sys.stderr,
    )
    print(json.dumps({"gpus": N, "servers": N, "decide": decide, "tick": tick}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
