"""make bench-fleet: the real coordinator (`palsd coordinator`, its own process) against a real
Mosquitto with N lightweight simulated hosts in this one process, stepping the group budget.

Each simulated host runs the real host rules (palsd.core.budget's FleetView, fed every group
budget and allocation it receives, decoded by the feed's own decoder), publishes a retained
status with the fleet section (every 2 s, and at once when its allocation changes, which is
its acknowledgement) and has its own demand, some hosts busy, some idle, changing at each step.

Measured:
- realloc_p99_ms: for each budget step, from publishing the new group budget until every host
  holds an allocation computed on it and the allocations have settled (the sum is within 0.5%
  of what the coordinator hands out for that budget, no raise left waiting); p99 over steps.
  Per-host arrival times of the first allocation on the new budget are printed too.
- max_over_group_budget_w: the largest amount by which the sum of what the group allows its
  hosts (each host's FleetView, evaluated at every message) exceeded the group budget; the
  simulated hosts get each group budget at the same instant, so the budget is the current one.
- coordinator_cpu_percent: the coordinator process's CPU time over the measured wall time.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import yaml  # noqa: E402

from palsd.core.budget import BudgetBook, BudgetEntry, FleetGroup, FleetRole  # noqa: E402
from palsd.feed.payload import BudgetMessage, Rules, decode_budget, encode  # noqa: E402
from palsd.fleet.topics import alloc_topic, budget_topic, host_status_topic  # noqa: E402
from tests.mosquitto import Broker  # noqa: E402

PREFIX = "bench/palsd"
GROUP = "site/row1"
COORD = "c1"
GPUS, MIN_W, MAX_W = 8, 200.0, 700.0
FLOOR_W, HOST_MAX_W = GPUS * MIN_W, GPUS * MAX_W
HOLD_S = 2.0  # the hosts' mqtt.groups[].hold_s: >= 3x the worst delivery delay


class SimHost:
    def __init__(self, host_id: str, share: float, demand_w: float) -> None:
        self.host_id = host_id
        self.group = FleetGroup(budget_topic(PREFIX, GROUP), share, (COORD,), hold_s=HOLD_S)
        self.alloc_topic = alloc_topic(PREFIX, GROUP, COORD, host_id)
        self.book = BudgetBook()
        self.demand_w = demand_w
        self.value_w = 0.0

    def allowed_w(self, now: float) -> float:
        view = self.book.fleet.get(self.group.group_origin)
        return 0.0 if view is None else view.in_force(now).watts

    def status(self, now: float) -> bytes:
        groups = self.book.fleet_status(now)
        fleet = {
            "floor_w": FLOOR_W,
            "max_w": HOST_MAX_W,
            "demand_w": self.demand_w,
            "draw_w": min(self.demand_w, self.value_w),
            "urgency": 1.0 if self.demand_w > 0.8 * HOST_MAX_W else 0.0,  # busy hosts
            "groups": groups,
        }
        return json.dumps({"fleet": fleet}, separators=(",", ":"), default=str).encode()


class Bench:
    def __init__(self, n: int, seed: int) -> None:
        rnd = random.Random(seed)
        share = 1.0 / n
        self.rnd = rnd
        self.hosts = {f"h{i:05d}": SimHost(f"h{i:05d}", share, self._demand()) for i in range(n)}
        self.by_alloc = {h.alloc_topic: h for h in self.hosts.values()}
        self.rules = Rules(1e12, 86400, 30)
        self.group_w = 0.0
        self.max_over_w = 0.0
        self.total_w = 0.0
        self.dirty: set[str] = set()
        self.step: dict[str, Any] | None = None
        self.first_new: list[float] = []
        self.messages = 0
        self.errors: list[str] = []
        self.delays_ms: list[float] = []  # coordinator's publish -> this process, per allocation

    def _demand(self) -> float:
        # A third of the hosts busy (near their maximum), the rest between idle and half.
        if self.rnd.random() < 1 / 3:
            return self.rnd.uniform(0.8, 1.0) * HOST_MAX_W
        return self.rnd.uniform(FLOOR_W + 100, 0.5 * HOST_MAX_W)

    def recompute(self, now: float) -> None:
        self.total_w = 0.0
        for h in self.hosts.values():
            h.value_w = h.allowed_w(now)
            self.total_w += h.value_w
        self.check()

    def scaled_down(self, now: float) -> int:
        """Hosts that count their allocation lower than sent (it came just after a cut)."""
        count = 0
        for h in self.hosts.values():
            view = h.book.fleet.get(h.group.group_origin)
            held = None if view is None else view.held.get(COORD)
            if held is not None and h.allowed_w(now) < held.watts - 1:
                count += 1
        return count

    def check(self) -> None:
        if self.group_w > 0:
            self.max_over_w = max(self.max_over_w, self.total_w - self.group_w)

    def on_group(self, raw: bytes, now: float) -> None:
        msg = decode_budget(raw, now, self.rules, topic=budget_topic(PREFIX, GROUP))
        assert isinstance(msg, BudgetMessage), msg
        self.group_w = msg.budget_w
        for h in self.hosts.values():
            entry = BudgetEntry(
                msg.budget_w * h.group.share,
                expires_at=msg.expires_at,
                set_at=now,
                origin=h.group.group_origin,
                seq=msg.seq,
                fleet=FleetRole(h.group),
            )
            h.book = h.book.with_facility(h.group.group_origin, entry)
        self.recompute(now)

    def on_alloc(self, topic: str, raw: bytes, now: float) -> None:
        h = self.by_alloc.get(topic)
        if h is None:
            return
        msg = decode_budget(raw, now, self.rules, topic=topic)
        if not isinstance(msg, BudgetMessage):
            return
        self.messages += 1
        self.delays_ms.append((now - msg.issued_at) * 1000)
        entry = BudgetEntry(
            msg.budget_w,
            expires_at=msg.expires_at,
            set_at=now,
            origin=topic,
            seq=msg.seq,
            fleet=FleetRole(h.group, COORD),
        )
        h.book = h.book.with_facility(topic, entry)
        before = h.value_w
        h.value_w = h.allowed_w(now)
        self.total_w += h.value_w - before
        self.check()
        self.dirty.add(h.host_id)
        step = self.step
        on_new = step is not None and msg.reason.endswith(f"a {step['group_w']:.0f} W group budget")
        if step is not None and on_new and h.host_id not in step["got"]:
            step["got"].add(h.host_id)
            self.first_new.append((now - step["at"]) * 1000)


def coordinator_config(n: int, broker: Broker, path: Path) -> None:
    cfg = {
        "coordinator_id": COORD,
        "group": GROUP,
        "members": [{"host_id": f"h{i:05d}", "share": 1.0 / n} for i in range(n)],
        "mqtt": {"url": broker.url, "topic_prefix": PREFIX},
        "allocation": {
            "ttl_s": 15.0,
            "refresh_s": 5.0,
            "round_s": 0.5,
            "stale_after_s": 30.0,
            "host_hold_s": HOLD_S,
            "min_change_w": 10.0,
        },
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "warning"},
    }
    path.write_text(yaml.safe_dump(cfg))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.hosts
    bench = Bench(n, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp_s:
        tmp = Path(tmp_s)
        broker = Broker(tmp / "broker")
        broker.start()
        coord_cfg = tmp / "coordinator.yaml"
        coordinator_config(n, broker, coord_cfg)
        log = open(tmp / "coordinator.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "palsd.cli.palsd", "coordinator", "--config", str(coord_cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        seq = 0
        group_topic = budget_topic(PREFIX, GROUP)

        async def publish_group(client: aiomqtt.Client, watts: float) -> None:
            nonlocal seq
            seq += 1
            msg = {
                "budget_w": watts,
                "seq": seq,
                "issued_at": time.time(),
                "ttl_s": 3600,
                "sender": "bench",
            }
            await client.publish(group_topic, encode(msg), qos=1, retain=True, timeout=10)

        try:
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-hosts") as client:
                await client.subscribe(group_topic, qos=1)
                await client.subscribe(f"{PREFIX}/{GROUP}/alloc/{COORD}/+/budget", qos=1)

                async def receive() -> None:
                    async for m in client.messages:
                        raw = m.payload if isinstance(m.payload, bytes) else b""
                        topic = str(m.topic)
                        now = time.time()
                        try:
                            if topic == group_topic:
                                bench.on_group(raw, now)
                            else:
                                bench.on_alloc(topic, raw, now)
                        except Exception as err:  # keep reading: a dead reader stalls the broker
                            bench.errors.append(repr(err))

                async def statuses() -> None:
                    last_all = 0.0
                    while True:
                        now = time.time()
                        if now - last_all >= 5.0:
                            targets = list(bench.hosts)
                            last_all = now
                        else:
                            targets = sorted(bench.dirty)
                        bench.dirty.clear()
                        for i in range(0, len(targets), 100):
                            await asyncio.gather(
                                *(
                                    client.publish(
                                        host_status_topic(PREFIX, h),
                                        bench.hosts[h].status(now),
                                        qos=0,
                                        retain=True,
                                        timeout=10,
                                    )
                                    for h in targets[i : i + 100]
                                )
                            )
                        await asyncio.sleep(0.05)

                tasks = [asyncio.create_task(receive()), asyncio.create_task(statuses())]
                base_w = n * args.mean_host_w
                await publish_group(client, base_w)
                # Warm-up: the coordinator's allocation lifetime after its start, then settle.
                await asyncio.sleep(args.warmup_s)
                cpu0, wall0 = cpu_s(proc.pid), time.monotonic()
                settle: list[float] = []
                for k in range(args.steps):
                    target = base_w * (0.85 if k % 2 == 0 else 1.0)
                    # Load moves too: a tenth of the hosts change demand at each step.
                    for h in bench.rnd.sample(list(bench.hosts.values()), n // 10):
                        h.demand_w = bench._demand()
                        bench.dirty.add(h.host_id)
                    bench.step = {"group_w": target, "at": time.time(), "got": set()}
                    await publish_group(client, target)
                    handed = min(target, n * HOST_MAX_W)
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < args.step_s:
                        await asyncio.sleep(0.01)
                        done = len(bench.step["got"]) == n
                        if done and bench.total_w >= 0.995 * handed:
                            settle.append((time.monotonic() - t0) * 1000)
                            break
                    else:
                        settle.append(math.inf)
                        print(
                            f"step {k}: not settled in {args.step_s} s: "
                            f"{len(bench.step['got'])}/{n} hosts on the new budget, "
                            f"sum {bench.total_w / handed:.4f} of the budget, "
                            f"{bench.scaled_down(time.time())} hosts count their allocation lower"
                        )
                    await asyncio.sleep(max(0.0, args.step_s - (time.monotonic() - t0)))
                cpu1, wall1 = cpu_s(proc.pid), time.monotonic()
                for t in tasks:
                    t.cancel()
                await asyncio.wait(tasks, timeout=5)
                broker.stop()  # first, so the client's own exit cannot wait on a busy broker
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            broker.stop()
            tail = (tmp / "coordinator.log").read_text()[-1500:]
    settled = sorted(settle)
    p99 = settled[min(len(settled) - 1, math.ceil(0.99 * len(settled)) - 1)]
    first = sorted(bench.first_new)
    print(
        f"{n} hosts, {args.steps} steps of {args.step_s:.0f} s between "
        f"{0.85 * n * args.mean_host_w / 1e6:.2f} and {n * args.mean_host_w / 1e6:.2f} MW; "
        f"{bench.messages} allocations received"
    )
    if first:
        print(
            "first allocation on the new budget, per host: "
            f"p50 {statistics.median(first):.0f} ms, "
            f"p99 {first[min(len(first) - 1, int(0.99 * len(first)))]:.0f} ms, "
            f"max {first[-1]:.0f} ms"
        )
    delays = sorted(bench.delays_ms)
    if delays:
        print(
            "allocation delivery (coordinator publish -> simulated host): "
            f"p50 {statistics.median(delays):.0f} ms, "
            f"p99 {delays[min(len(delays) - 1, int(0.99 * len(delays)))]:.0f} ms, "
            f"max {delays[-1]:.0f} ms (host rule 3 assumes < hold_s/3 = {HOLD_S / 3:.2f} s)"
        )
    if bench.errors:
        print(f"{len(bench.errors)} errors in the simulated hosts, first: {bench.errors[0]}")
    print("settled per step (ms):", [round(s) if math.isfinite(s) else None for s in settle])
    if any(not math.isfinite(s) for s in settle):
        print("coordinator log tail:", tail)
    return {
        "hosts": n,
        "realloc_p99_ms": round(p99, 1) if math.isfinite(p99) else None,
        "max_over_group_budget_w": round(max(0.0, bench.max_over_w), 3),
        "coordinator_cpu_percent": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=12.0)
    parser.add_argument("--warmup-s", type=float, default=25.0)
    parser.add_argument("--mean-host-w", type=float, default=3200.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # paho's "pending publish calls" noise
    result = asyncio.run(
        asyncio.wait_for(run(args), timeout=args.warmup_s + 60 + 3 * args.steps * args.step_s)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
