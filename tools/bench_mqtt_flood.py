"""Benchmark: a flood of signed budgets over a real broker; nothing lost, no race, the tick holds.

Starts its own Mosquitto, `palsd sim-host --gpus 8 --servers 4` and `palsd run` with the feed on
and signatures required, publishes N signed budgets (default 10,000) at a fixed rate (default
200/s) alternating between two budgets (3,200 W and 2,400 W for 8 GPUs, so every other one is a
cut below the limits in force) on the host's budget topic, and measures:

- sent: budgets published (QoS 1, each acknowledged by the broker);
- applied_last: the last budget (a cut) is the one in force at the end and the simulated GPUs'
  limits sum to at most it;
- lost_uncounted: budgets sent that palsd neither read (palsd_mqtt_received_total) nor counted
  as dropped (palsd_mqtt_dropped_total); palsd's own identity (every received message has one
  counted outcome) is checked and printed beside it;
- max_tick_gap_s: the longest time between two control ticks (`decision` log lines) during the
  flood;
- over_budget_ms: the longest time the sum of the limits stayed above the budget in force. The
  budget in force steps when the feed hands a budget over (`mqtt_budget_accepted`), the limits
  when palsd's writes complete (`power_limits_applied`: `t_wall`, `sum_limit_w`); a sampler that
  reads the sim host's limits every ~20 ms cross-checks it (printed, not in the JSON).

The last line is one JSON object:
{"sent", "applied_last", "lost_uncounted", "max_tick_gap_s", "over_budget_ms"}

    make bench-mqtt-flood      or    .venv/bin/python tools/bench_mqtt_flood.py
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from palsd.feed.signing import signed_message  # noqa: E402
from tests.integration.procs import gpu_limits, palsd, palsd_config, sim_host  # noqa: E402
from tests.mosquitto import Broker  # noqa: E402

PREFIX = "flood/palsd"
HOST_ID = "flood1"
TOPIC = f"{PREFIX}/{HOST_ID}/budget"
KEY = b"bench-flood-key"
EPS_W = 0.01


def plan(n: int, high_w: float, low_w: float) -> list[float]:
    """High, low, high, ... ending on a low one (a cut), so the last budget's effect shows."""
    return [low_w if (n - i) % 2 == 1 else high_w for i in range(n)]


POISON = '{"price_per_mwh":1,"seq":1,"issued_at":%d,"sender":"x","sig":"\u00e9"}'


async def publish_all(
    port: int, budgets: list[float], rate_per_s: float, poison_every: int
) -> dict[str, float]:
    now = time.time()
    # issue 12's poison message (a non-ASCII sig), on the price topic, between the budgets
    poison = (POISON % now).encode()
    payloads = [
        signed_message(
            KEY,
            TOPIC,
            "budget",
            {"budget_w": w, "seq": seq, "issued_at": int(now), "ttl_s": 600, "sender": "flood"},
        )
        for seq, w in enumerate(budgets, start=1)
    ]
    async with aiomqtt.Client("127.0.0.1", port, identifier="flood-publisher") as client:
        started_wall = time.time()
        started = time.monotonic()
        for i, payload in enumerate(payloads):
            delay = started + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.publish(TOPIC, payload, qos=1)
            if poison_every and (i + 1) % poison_every == 0:
                await client.publish(f"{PREFIX}/price", poison, qos=1)
        took_s = time.monotonic() - started
    return {"start": started_wall, "end": started_wall + took_s, "took_s": took_s}


class LimitSampler(threading.Thread):
    """Reads the sim host's limits every `interval_s`; (time, sum of limits) per read."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop_event.is_set():
                try:
                    gpus = client.get(f"{self.url}/sim/v1/gpus").json()["gpus"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                self.samples.append((time.time(), sum(g["power_limit_w"] for g in gpus)))
                self.stop_event.wait(self.interval_s)


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), NaN if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def over_budget_from_log(
    budgets: list[tuple[float, float]], writes: list[tuple[float, float]], start_sum_w: float
) -> list[tuple[float, float, str]]:
    """Every stretch with the limits' sum above the budget in force: (start, seconds, cause),
    cause "cut" (a lower budget arrived; the stretch is its enforcement) or "write" (a write
    raised the limits above the budget already in force: the race of issue 12)."""
    events = [(t, 0, w) for t, w in budgets] + [(t, 1, w) for t, w in writes]
    events.sort()
    budget_w: float | None = None
    sum_w = start_sum_w
    since: tuple[float, str] | None = None
    stretches: list[tuple[float, float, str]] = []
    for t, kind, w in events:
        if kind == 0:
            budget_w = w
        else:
            sum_w = w
        over = budget_w is not None and sum_w > budget_w + EPS_W
        if over and since is None:
            since = (t, "cut" if kind == 0 else "write")
        elif not over and since is not None:
            stretches.append((since[0], t - since[0], since[1]))
            since = None
    if since is not None:
        stretches.append((since[0], float("inf"), since[1]))
    return stretches


def over_budget_from_samples(
    budgets: list[tuple[float, float]], samples: list[tuple[float, float]]
) -> tuple[float, float]:
    """Longest run of samples above the budget in force: (to the last sample over it, to the
    first sample back under it), a lower and an upper bound."""
    times = [t for t, _ in budgets]
    lo = hi = 0.0
    first: float | None = None
    last = 0.0
    for t, sum_w in samples:
        i = bisect.bisect_right(times, t) - 1
        over = i >= 0 and sum_w > budgets[i][1] + EPS_W
        if over:
            if first is None:
                first = t
            last = t
        elif first is not None:
            lo, hi = max(lo, last - first), max(hi, t - first)
            first = None
    return lo, hi


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(metrics: dict[Any, float], name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in metrics.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0, help="budgets per second")
    parser.add_argument("--high-w", type=float, default=3200.0)
    parser.add_argument("--low-w", type=float, default=2400.0)
    parser.add_argument("--period-s", type=float, default=0.5, help="palsd control period")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="sim-host sampling")
    parser.add_argument(
        "--poison-every",
        type=int,
        default=0,
        help="also publish issue 12's poison message after every N budgets (default: none)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    budgets = plan(args.budgets, args.high_w, args.low_w)
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp_name:
        tmp = args.workdir or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        key_file = tmp / "feed.key"
        key_file.write_text(KEY.decode() + "\n")
        broker = Broker(tmp / "broker")
        broker.start()
        try:
            with sim_host(tmp, gpus=8, servers=4) as sim:
                start_sum_w = sum(gpu_limits(sim).values())
                mqtt = {
                    "enabled": True,
                    "url": broker.url,
                    "host_id": HOST_ID,
                    "topic_prefix": PREFIX,
                    "max_budget_w": 100_000,
                    "require_signature": True,
                    "hmac_key_file": str(key_file),
                }
                cfg = palsd_config(
                    sim,
                    tmp,
                    mqtt=mqtt,
                    control={"period_s": args.period_s},
                    logging={"format": "json", "level": "info"},
                )
                with palsd(tmp, cfg) as d:
                    deadline = time.monotonic() + 30
                    while not d.events("mqtt_connected"):
                        if time.monotonic() > deadline:
                            raise SystemExit("palsd's MQTT feed did not connect")
                        time.sleep(0.05)
                    sampler = LimitSampler(sim["url"], args.sample_ms / 1000)
                    sampler.start()
                    pids = {"palsd": d.proc.pid, "sim-host": sim["proc"].pid}
                    pids["mosquitto"] = broker.proc.pid if broker.proc else None
                    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
                    sent = asyncio.run(
                        publish_all(broker.port, budgets, args.rate, args.poison_every)
                    )
                    cpu_flood = {n: cpu_s(pid) - cpu_before[n] for n, pid in pids.items()}
                    # The end state: the last budget in force, the limits under it.
                    last_seq, last_w = len(budgets), budgets[-1]
                    applied_last = False
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        budget = d.status()["budget"]
                        if (
                            budget.get("seq") == last_seq
                            and budget.get("origin") == TOPIC
                            and sum(gpu_limits(sim).values()) <= last_w + EPS_W
                        ):
                            applied_last = True
                            break
                        time.sleep(0.2)
                    time.sleep(2 * args.period_s)
                    sampler.stop_event.set()
                    sampler.join()
                    metrics = scrape(d.metrics_port())
                    accepted = [e for e in d.events("mqtt_budget_accepted") if e["origin"] == TOPIC]
                    applied = d.events("power_limits_applied")
                    decisions = d.events("decision")
                    status = d.status()
        finally:
            broker.stop()
    load_after = os.getloadavg()

    received = total(metrics, "palsd_mqtt_received_total")
    dropped = total(metrics, "palsd_mqtt_dropped_total")
    outcomes = total(metrics, "palsd_mqtt_messages_total") + total(
        metrics, "palsd_mqtt_rejected_total"
    )
    poisons = len(budgets) // args.poison_every if args.poison_every else 0
    lost_uncounted = max(0, len(budgets) + poisons - int(received + dropped))
    budget_steps = [(ts(e), float(e["budget_w"])) for e in accepted]
    writes = [(float(e["t_wall"]), float(e["sum_limit_w"])) for e in applied if "t_wall" in e]
    stretches = over_budget_from_log(budget_steps, writes, start_sum_w)
    longest = max(stretches, key=lambda x: x[1], default=(0.0, 0.0, ""))
    over_s = longest[1]
    sampled_lo_s, sampled_hi_s = over_budget_from_samples(budget_steps, sampler.samples)
    tick_times = sorted(ts(e) for e in decisions)
    window = [t for t in tick_times if sent["start"] - 1 <= t <= sent["end"] + 1]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    max_gap_s = max(gaps) if gaps else float("nan")
    rejected = {
        dict(labels)["reason"]: v
        for (n, labels), v in metrics.items()
        if n == "palsd_mqtt_rejected_total" and v
    }
    by_trigger: dict[str, int] = {}
    for e in applied:
        by_trigger[e.get("trigger", "?")] = by_trigger.get(e.get("trigger", "?"), 0) + 1

    print(
        f"published {len(budgets)} signed budgets in {sent['took_s']:.1f} s "
        f"({len(budgets) / sent['took_s']:.0f}/s asked {args.rate:.0f}/s) and {poisons} poison "
        f"messages, alternating "
        f"{args.high_w:.0f}/{args.low_w:.0f} W; control period {args.period_s} s; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (2 cores shared)"
    )
    print(
        f"palsd read {received:.0f}, dropped {dropped:.0f} (queue full); outcomes counted "
        f"{outcomes:.0f} (= read: {outcomes == received}): handed over "
        f"{total(metrics, 'palsd_mqtt_messages_total', kind='budget'):.0f}, superseded "
        f"{total(metrics, 'palsd_mqtt_messages_total', kind='superseded'):.0f}, duplicate "
        f"{total(metrics, 'palsd_mqtt_messages_total', kind='duplicate'):.0f}, rejected "
        f"{rejected or 0}; lost uncounted {lost_uncounted}"
    )
    print(
        "CPU seconds during the flood: "
        + ", ".join(f"{n} {v:.1f}" for n, v in cpu_flood.items())
        + f" (of {sent['took_s']:.1f} s wall)"
    )
    print(
        f"limit writes by trigger {by_trigger}; ticks in the flood window {len(window)}, "
        f"max gap {max_gap_s:.3f} s; palsd_tick_overruns_total "
        f"{total(metrics, 'palsd_tick_overruns_total'):.0f}"
    )
    for cause, what in (("cut", "a cut until enforced"), ("write", "a write over the budget")):
        mine = sorted((d for _, d, c in stretches if c == cause), reverse=True)
        print(
            f"over budget (log timeline), {what}: {len(mine)} stretches, longest "
            f"{[round(d * 1000, 1) for d in mine[:5]]} ms"
        )
    if longest[1] > 0:
        at = datetime.fromtimestamp(longest[0]).isoformat()
        print(f"the longest ({longest[2]}) began {at}")
    print(
        f"over budget (sim-host samples every ~{args.sample_ms:.0f} ms, {len(sampler.samples)} "
        f"samples): longest run {sampled_lo_s * 1000:.1f} ms to {sampled_hi_s * 1000:.1f} ms"
    )
    print(
        f"end: budget in force {status['budget'].get('effective_w')} W seq "
        f"{status['budget'].get('seq')}, applied_last {applied_last}"
    )
    result = {
        "sent": len(budgets),
        "applied_last": applied_last,
        "lost_uncounted": lost_uncounted,
        "max_tick_gap_s": round(max_gap_s, 3),
        "over_budget_ms": round(over_s * 1000, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
