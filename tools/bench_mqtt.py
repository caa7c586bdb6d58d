"""Benchmark: publish to power limits applied, over a real broker, for lowering budgets.

Starts its own Mosquitto, a simulated 8-GPU host with 4 servers (`palsd sim-host`) and
`palsd run` with the MQTT feed on, publishes N budget changes alternating lower/higher (every
lower one is below the limits in force, so each forces an immediate lowering), and measures, per
lowering change, from just before publish to the daemon's `power_limits_applied` log line for
that sequence number (`t_wall`, stamped right after the last write). Prints as its last line one
JSON object: changes, lowering, p50_ms, p99_ms, max_ms, unmeasured.

    make bench-mqtt            or    .venv/bin/python tools/bench_mqtt.py --changes 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import httpx  # noqa: E402

from palsd.feed.payload import encode  # noqa: E402
from tests.integration.procs import gpu_limits, palsd, palsd_config, sim_host  # noqa: E402
from tests.mosquitto import Broker  # noqa: E402

PREFIX = "bench/palsd"
TOPIC = f"{PREFIX}/bench1/budget"


def plan(changes: int, start_w: float, floor_w: float) -> list[float]:
    """Alternate a lower budget (each below the last lower one) and a higher one."""
    lowers = (changes + 1) // 2
    step = (start_w - floor_w) / (lowers + 1)
    out: list[float] = []
    for i in range(changes):
        low = start_w - step * (i // 2 + 1)
        out.append(round(low if i % 2 == 0 else low + 600, 3))
    return out


async def publish_all(port: int, budgets: list[float], interval_s: float) -> dict[int, float]:
    sent: dict[int, float] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-publisher") as client:
        for seq, watts in enumerate(budgets, start=1):
            msg = {
                "budget_w": watts,
                "seq": seq,
                "issued_at": time.time(),
                "ttl_s": 600,
                "sender": "bench",
            }
            payload = encode(msg)
            sent[seq] = time.time()
            await client.publish(TOPIC, payload, qos=1)
            await asyncio.sleep(interval_s)
    return sent


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument(
        "--interval-ms", type=float, default=100.0, help="between publications (default 100)"
    )
    parser.add_argument("--period-s", type=float, default=0.5, help="palsd control period")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp_name:
        tmp = args.workdir or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        broker = Broker(tmp / "broker")
        broker.start()
        try:
            with sim_host(tmp, gpus=8, servers=4) as sim:
                limits = gpu_limits(sim)
                data = httpx.get(f"{sim['url']}/sim/v1/gpus", timeout=5).json()
                floor_w = sum(g["min_limit_w"] for g in data["gpus"])
                start_w = sum(limits.values()) * 0.95
                mqtt = {
                    "enabled": True,
                    "url": broker.url,
                    "host_id": "bench1",
                    "topic_prefix": PREFIX,
                    "max_budget_w": 100_000,
                }
                cfg = palsd_config(
                    sim,
                    tmp,
                    mqtt=mqtt,
                    control={"period_s": args.period_s},
                    logging={"format": "json", "level": "info"},
                )
                with palsd(tmp, cfg) as d:
                    deadline = time.monotonic() + 20
                    while not d.events("mqtt_connected"):
                        if time.monotonic() > deadline:
                            raise SystemExit("palsd's MQTT feed did not connect")
                        time.sleep(0.05)
                    budgets = plan(args.changes, start_w, floor_w + 8)
                    sent = asyncio.run(publish_all(broker.port, budgets, args.interval_ms / 1000))
                    time.sleep(2 * args.period_s + 0.5)
                    applied = d.events("power_limits_applied")
                    rejected = d.events("mqtt_message_rejected")
                    accepted = d.events("mqtt_budget_accepted")
        finally:
            broker.stop()
    first_apply: dict[int, dict[str, Any]] = {}
    for e in applied:
        seq = e.get("budget_seq")
        if e.get("budget_origin") == TOPIC and seq is not None and seq not in first_apply:
            first_apply[seq] = e
    # The feed logs acceptance right after handing the budget to the daemon: publish -> there is
    # the broker and the feed; from there to t_wall is the daemon, the actuator and the GPU writes.
    accepted_at = {
        e["seq"]: datetime.fromisoformat(e["timestamp"]).timestamp()
        for e in accepted
        if e.get("origin") == TOPIC
    }
    feed_ms: list[float] = []
    act_ms: list[float] = []
    daemon_ms: list[float] = []  # the daemon's own: budget arrival -> last limit written
    latencies_ms: list[float] = []
    missing = []
    for seq in range(1, len(budgets) + 1, 2):  # the lowering ones
        e = first_apply.get(seq)
        if e is None or e["sum_limit_w"] > budgets[seq - 1] + 1e-6:
            missing.append(seq)
            continue
        latencies_ms.append((e["t_wall"] - sent[seq]) * 1000)
        if e.get("since_arrival_ms") is not None:
            daemon_ms.append(e["since_arrival_ms"])
        if seq in accepted_at:
            feed_ms.append((accepted_at[seq] - sent[seq]) * 1000)
            act_ms.append((e["t_wall"] - accepted_at[seq]) * 1000)
    by_trigger: dict[str, int] = {}
    for seq in range(1, len(budgets) + 1, 2):
        if seq in first_apply:
            t = first_apply[seq]["trigger"]
            by_trigger[t] = by_trigger.get(t, 0) + 1
    print(
        f"published {len(budgets)} changes every {args.interval_ms} ms; "
        f"{len(latencies_ms)} lowering ones measured, {len(missing)} without an application "
        f"under the budget, {len(rejected)} rejected; applied by trigger {by_trigger}"
    )
    for name, part in (
        ("publish -> feed handed over", feed_ms),
        ("feed -> limits", act_ms),
        ("daemon: budget arrival -> last limit written", daemon_ms),
    ):
        if part:
            print(
                f"{name}: p50 {statistics.median(part):.2f} ms, "
                f"p99 {quantile(part, 0.99):.2f} ms, max {max(part):.2f} ms"
            )
    if not latencies_ms:
        print(json.dumps({"changes": len(budgets), "error": "nothing measured"}))
        return 1
    result = {
        "changes": len(budgets),
        "lowering": len(latencies_ms),
        "p50_ms": round(statistics.median(latencies_ms), 2),
        "p99_ms": round(quantile(latencies_ms, 0.99), 2),
        "max_ms": round(max(latencies_ms), 2),
        "unmeasured": len(missing),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
