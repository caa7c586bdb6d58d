"""The fleet end to end on one machine: one real Mosquitto, three `palsd run` daemons each with
its own `palsd sim-host`, one `palsd coordinator`. Uneven load moves power to the busy host;
the coordinator, a host and the broker are killed and restarted; a sampler reads every
daemon's budget in force and every simulated GPU's limit the whole time, and the group is
never above its budget.

Waits are for events with generous deadlines (a loaded 2-core machine); nothing is timed.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from palsd.config import MqttGroupConfig
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.feed.payload import encode
from palsd.fleet.topics import fleet_roles
from tests.integration.procs import PALSD, Palsd, _stop, palsd_config, sim_host, wait_until
from tests.mosquitto import Broker, mosquitto_binary

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
]

PREFIX = "fleet/palsd"
GROUP = "row1/rack1"
GROUP_TOPIC = f"{PREFIX}/{GROUP}/budget"
HOSTS = ("busy", "idle1", "idle2")
SHARE = 1 / 3
GROUP_W = 2700.0  # 3 hosts x 2 GPUs (200..700 W): floors 1200 W, shares 900 W each
FLOOR_W = 400.0
GROUP_CFG = {"topic": GROUP, "share": SHARE, "coordinators": ["c1"], "hold_s": 2.0}


def publish_group(broker: Broker, seq: int, watts: float) -> None:
    msg = {"budget_w": watts, "seq": seq, "issued_at": time.time(), "ttl_s": 600, "sender": "fm"}
    subprocess.run(
        ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-r", "-t", GROUP_TOPIC, "-s"],
        input=encode(msg),
        check=True,
        timeout=10,
        stderr=subprocess.DEVNULL,
    )


def api_status(socket_path: Path) -> dict[str, Any] | None:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=2) as c:
            return dict(c.get("http://palsd/v1/status").json())
    except (httpx.HTTPError, ValueError, OSError):
        return None


class Facility(threading.Thread):
    """The facility's power manager: re-publishes the group budget every second (a new seq
    each time), as a real one refreshes budgets well inside their lifetime."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(daemon=True)
        self.broker, self.group_w, self.seq = broker, GROUP_W, 1
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()

    def set(self, watts: float) -> None:
        with self.lock:
            self.group_w, self.seq = watts, self.seq + 1
            publish_group(self.broker, self.seq, watts)

    def run(self) -> None:
        while not self.stop_flag.wait(1.0):
            try:
                self.set(self.group_w)
            except (subprocess.SubprocessError, OSError):
                pass  # the broker is down for a moment: the next second tries again


def _log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and "timestamp" in item:
            item["t"] = datetime.fromisoformat(item["timestamp"]).timestamp()
            out.append(item)
    return out


def budget_timeline(host: str, path: Path) -> list[tuple[float, float]]:
    """(time, what the group allowed this host from then on), replayed exactly: every budget
    the daemon's feed handed over, in order, through the same budget book the daemon runs.
    Between two hand-overs the value can only fall (expiry), so the events are the maxima."""
    roles = fleet_roles(PREFIX, [MqttGroupConfig(**GROUP_CFG)], host)
    book: BudgetBook | None = None
    out: list[tuple[float, float]] = []
    for e in _log_events(path):
        if e.get("event") == "palsd_started":
            book = BudgetBook()
            out.append((e["t"], FLOOR_W))  # fallback_w until the group budget arrives
        elif e.get("event") == "mqtt_budget_accepted" and book is not None:
            entry = BudgetEntry(
                float(e["budget_w"]),
                expires_at=e["expires_at"],
                set_at=e["t"],
                origin=e["origin"],
                seq=e["seq"],
                fleet=roles.get(e["origin"]),
            )
            book = book.with_facility(e["origin"], entry)
            view = book.fleet.get(GROUP_TOPIC)
            out.append((e["t"], FLOOR_W if view is None else view.in_force(e["t"]).watts))
    return out


def limit_timeline(path: Path) -> list[tuple[float, float]]:
    """(time, sum of this host's GPU limits from then on) from every write palsd logged."""
    return [
        (float(e["t_wall"]), float(e["sum_limit_w"]))
        for e in _log_events(path)
        if e.get("event") == "power_limits_applied"
    ]


def worst_sum(
    timelines: dict[str, list[tuple[float, float]]],
    bound: Any,
    since: float,
    skip: dict[str, tuple[float, float]] | None = None,
) -> tuple[float, float, dict[str, float]]:
    """The largest excess of the hosts' summed values over bound(t), at every event time after
    `since`; a host inside its `skip` window (palsd restarting) is left out then."""
    times = sorted({t for tl in timelines.values() for t, _ in tl if t >= since})
    worst: tuple[float, float, dict[str, float]] = (-math.inf, 0.0, {})
    for t in times:
        values = {}
        for h, tl in timelines.items():
            lo, hi = (skip or {}).get(h, (math.inf, -math.inf))
            if lo <= t <= hi:
                continue
            before = [w for when, w in tl if when <= t]
            if before:
                values[h] = before[-1]
        excess = math.fsum(values.values()) - bound(t)
        if excess > worst[0]:
            worst = (excess, t, values)
    return worst


@contextmanager
def coordinator(tmp: Path, broker: Broker) -> Iterator[subprocess.Popen[bytes]]:
    cfg = {
        "coordinator_id": "c1",
        "group": GROUP,
        "members": [{"host_id": h, "share": SHARE} for h in HOSTS],
        "mqtt": {"url": broker.url, "topic_prefix": PREFIX, "reconnect_max_s": 0.5},
        "allocation": {"ttl_s": 4.0, "refresh_s": 1.0, "round_s": 0.3, "stale_after_s": 4.0},
        "metrics": {"port": 0},
        "logging": {"format": "json"},
    }
    path = tmp / "coordinator.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp / "coordinator.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [*PALSD, "coordinator", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield proc
    finally:
        _stop(proc)
        log.close()


def start_palsd(tmp: Path, cfg: dict[str, Any]) -> Palsd:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "palsd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp / "palsd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*PALSD, "run", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
        )
    return Palsd(proc, path, log_path, Path(cfg["api"]["socket"]))


def fleet_budget(d: Palsd) -> float | None:
    st = api_status(d.socket)
    if st is None or st["budget"]["source"] != "facility":
        return None
    return float(st["budget"]["effective_w"])


def test_fleet_moves_power_to_the_busy_host_and_survives_kills(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    publish_group(broker, 1, GROUP_W)
    with ExitStack() as stack:
        stack.callback(broker.stop)
        facility = Facility(broker)
        facility.start()
        stack.callback(facility.stop_flag.set)
        sims: dict[str, dict[str, Any]] = {}
        daemons: dict[str, Palsd] = {}
        cfgs: dict[str, dict[str, Any]] = {}
        for h in HOSTS:
            d = tmp_path / h
            d.mkdir()
            rate = "12" if h == "busy" else "0.3"
            sims[h] = stack.enter_context(
                sim_host(d, 2, 1, "--workload", "poisson", "--rate", rate, "--seed", "1")
            )
            mqtt = {
                "enabled": True,
                "url": broker.url,
                "host_id": h,
                "topic_prefix": PREFIX,
                "status_interval_s": 0.3,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
                "groups": [GROUP_CFG],
            }
            cfgs[h] = palsd_config(
                sims[h], d, mqtt=mqtt, budget={"fallback_w": FLOOR_W}, control={"period_s": 0.3}
            )
        for h in HOSTS:
            daemons[h] = start_palsd(tmp_path / h, cfgs[h])
            stack.callback(lambda h=h: daemons[h].stop())
        for h in HOSTS:
            wait_until(lambda h=h: fleet_budget(daemons[h]) is not None, 60, f"{h} in the fleet")
        armed_at = time.time()  # every host holds the group's rules from here on
        coord = stack.enter_context(coordinator(tmp_path, broker))

        def busy_above_share() -> bool:
            b = fleet_budget(daemons["busy"])
            return b is not None and b > SHARE * GROUP_W + 150

        # 1. Uneven load: the busy host gets more than its fixed share.
        wait_until(busy_above_share, 90, "power moved to the busy host")
        idle = [fleet_budget(daemons[h]) or 0.0 for h in ("idle1", "idle2")]
        assert all(w < SHARE * GROUP_W for w in idle), idle

        # 2. The coordinator dies: hosts fall back (at most their share); it comes back and
        #    moves power again.
        coord.send_signal(signal.SIGKILL)
        coord.wait(timeout=15)
        wait_until(
            lambda: (b := fleet_budget(daemons["busy"])) is not None and b <= SHARE * GROUP_W,
            30,
            "busy host back at its share once its allocation expired",
        )
        coord = stack.enter_context(coordinator(tmp_path, broker))
        wait_until(busy_above_share, 90, "power moved again after the coordinator restart")

        # 3. A host is killed (SIGKILL: its limits stay) and restarted: it rejoins at its floor.
        daemons["idle2"].stop(signal.SIGKILL)
        killed_at = time.time()
        time.sleep(1.0)
        daemons["idle2"] = start_palsd(tmp_path / "idle2", cfgs["idle2"])
        wait_until(lambda: fleet_budget(daemons["idle2"]) is not None, 60, "idle2 back")
        wait_until(lambda: daemons["idle2"].events("decision"), 60, "idle2 deciding")
        back_at = time.time()
        wait_until(
            lambda: (b := fleet_budget(daemons["idle2"])) is not None and b >= FLOOR_W,
            60,
            "idle2 allocated again",
        )

        # 4. The broker dies and comes back (no persistence: the facility re-publishes).
        broker.stop(signal.SIGKILL)
        time.sleep(1.0)
        broker.start()
        wait_until(busy_above_share, 90, "power moved after the broker restart")

        # 5. A cut: the group budget drops; every host comes under it at once.
        cut_w = 2000.0
        cut_at = time.time()
        facility.set(cut_w)
        wait_until(
            lambda: sum(fleet_budget(d) or math.inf for d in daemons.values()) <= cut_w,
            30,
            "the group under the cut",
        )
        time.sleep(2.0)

    def bound(t: float) -> float:
        # The cut is checked from 1 s after it was published (its own delivery aside).
        return GROUP_W if t < cut_at + 1.0 else cut_w

    budgets = {h: budget_timeline(h, tmp_path / h / "palsd.log") for h in HOSTS}
    excess, when, values = worst_sum(budgets, bound, since=armed_at)
    limits = {h: limit_timeline(tmp_path / h / "palsd.log") for h in HOSTS}
    # While idle2's palsd is down and starting again its limits are not palsd's: a killed
    # palsd leaves them, a starting one first puts back the originals (docs/fleet.md).
    restart = {"idle2": (killed_at, back_at)}
    limit_excess, limit_when, limit_values = worst_sum(limits, bound, armed_at, restart)
    print(
        json.dumps(
            {
                "budget_events": sum(len(v) for v in budgets.values()),
                "max_budget_excess_w": round(excess, 3),
                "limit_events": sum(len(v) for v in limits.values()),
                "max_limit_excess_w": round(limit_excess, 3),
            }
        )
    )
    assert excess <= 1e-3, (when, values)
    assert limit_excess <= 1e-3, (limit_when, limit_values)
