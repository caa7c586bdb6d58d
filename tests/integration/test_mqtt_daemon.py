"""palsd end to end with its MQTT feed: a real Mosquitto, a real `palsd sim-host`, `palsd run`.
A budget published on the broker brings the simulated GPUs' limits under it; an infeasible
budget shows in the retained MQTT status; the poison message of issue 12 (a retained non-ASCII
`sig` on the price topic) costs nothing: the next signed budget is applied on the same session
and SIGTERM still restores every limit promptly."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from palsd.feed.payload import encode
from tests.integration.procs import (
    PALSD,
    gpu_limits,
    palsd,
    palsd_config,
    sim_host,
    wait_until,
)
from tests.mosquitto import Broker, mosquitto_binary

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
]

PREFIX = "e2e/palsd"


def mqtt_section(broker: Broker) -> dict[str, Any]:
    return {
        "enabled": True,
        "url": broker.url,
        "host_id": "sim1",
        "topic_prefix": PREFIX,
        "status_interval_s": 0.2,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
    }


def pub(broker: Broker, topic: str, payload: bytes, retain: bool = False) -> None:
    subprocess.run(
        ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", topic, "-s"]
        + (["-r"] if retain else []),
        input=payload,
        check=True,
        timeout=10,
    )


def retained_status(broker: Broker) -> dict[str, Any]:
    out = subprocess.run(
        ["mosquitto_sub", "-p", str(broker.port), "-t", f"{PREFIX}/sim1/status", "-C", "1"],
        capture_output=True,
        timeout=10,
        check=True,
    )
    return dict(json.loads(out.stdout))


def budget(seq: int, watts: float) -> bytes:
    msg = {"budget_w": watts, "seq": seq, "issued_at": time.time(), "ttl_s": 120, "sender": "t"}
    return encode(msg)


def test_budget_over_mqtt_caps_the_simulated_gpus_and_infeasible_is_published(tmp_path: Path):
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        with sim_host(tmp_path, gpus=4, servers=2) as sim:
            before = gpu_limits(sim)
            cfg = palsd_config(sim, tmp_path, mqtt=mqtt_section(broker))
            with palsd(tmp_path, cfg) as d:
                wait_until(lambda: d.events("mqtt_connected"), 20, "feed connected")
                target = round(sum(before.values()) * 0.6)
                pub(broker, f"{PREFIX}/sim1/budget", budget(1, target))
                applied = wait_until(
                    lambda: [
                        e
                        for e in d.events("power_limits_applied")
                        if e["budget_origin"] == f"{PREFIX}/sim1/budget"
                        and e["sum_limit_w"] <= target
                    ],
                    10,
                    "limits under the MQTT budget",
                )
                assert applied[0]["trigger"] == "budget"
                assert applied[0]["budget_seq"] == 1
                assert sum(gpu_limits(sim).values()) <= target + 1e-6
                status = d.status()
                assert status["budget"]["source"] == "facility"
                assert status["budget"]["effective_w"] == target
                assert status["feed"]["connected"] is True
                # Below the sum of minimum limits: infeasible, at the minimums, and said on MQTT.
                floor = sum(g["min_limit_w"] for g in status["gpus"])
                pub(broker, f"{PREFIX}/sim1/budget", budget(2, floor / 2))
                seen = wait_until(
                    lambda: (s := retained_status(broker)).get("infeasible") and s,
                    15,
                    "infeasible in the MQTT status",
                )
                assert seen["budget"]["effective_w"] == floor / 2
                wait_until(
                    lambda: sum(gpu_limits(sim).values()) <= floor + 1e-6, 10, "GPUs at minimum"
                )
    finally:
        broker.stop()


def test_poison_message_then_a_signed_budget_is_applied_and_sigterm_restores(tmp_path: Path):
    key_file = tmp_path / "feed.key"
    key_file.write_text("e2e-feed-key\n")
    broker = Broker(tmp_path / "broker")
    broker.start()
    # The reproduction from issue 12: anyone who can publish, without the key, retains this on
    # the price topic; palsd gets it at every (re)subscribe.
    now = int(time.time())
    poison = f'{{"price_per_mwh":1,"seq":1,"issued_at":{now},"sender":"x","sig":"é"}}'.encode()
    pub(broker, f"{PREFIX}/price", poison, retain=True)
    try:
        with sim_host(tmp_path, gpus=4, servers=2) as sim:
            before = gpu_limits(sim)
            mqtt = {
                **mqtt_section(broker),
                "require_signature": True,
                "hmac_key_file": str(key_file),
            }
            cfg = palsd_config(sim, tmp_path, mqtt=mqtt)
            with palsd(tmp_path, cfg) as d:
                wait_until(lambda: d.events("mqtt_connected"), 20, "feed connected")
                pub(broker, f"{PREFIX}/price", poison)  # and once more, live
                wait_until(
                    lambda: (
                        len(
                            [
                                e
                                for e in d.events("mqtt_message_rejected")
                                if e["reason"] == "bad_signature"
                            ]
                        )
                        >= 2
                    ),
                    20,
                    "both poison messages rejected as bad_signature",
                )
                # A valid budget, signed by the reference signer, on the same session.
                target = round(sum(before.values()) * 0.6)
                topic = f"{PREFIX}/sim1/budget"
                args = ["--budget-w", str(target), "--ttl-s", "120", "--seq", "5"]
                signed = subprocess.run(
                    [*PALSD, "sign-budget", "--key-file", str(key_file), "--topic", topic, *args],
                    capture_output=True,
                    check=True,
                    timeout=60,
                ).stdout
                pub(broker, topic, signed)
                wait_until(
                    lambda: [
                        e
                        for e in d.events("power_limits_applied")
                        if e["budget_origin"] == topic
                        and e["budget_seq"] == 5
                        and e["sum_limit_w"] <= target
                    ],
                    20,
                    "limits under the signed budget",
                )
                assert sum(gpu_limits(sim).values()) <= target + 1e-6
                feed = d.status()["feed"]
                assert feed["connected"] is True
                assert feed["reconnects_total"] == 0  # the session survived the poison
                assert d.events("mqtt_disconnected") == []
                # SIGTERM: the feed stops within its bound and every limit is put back.
                started = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                code = d.proc.wait(timeout=30)
                took_s = time.monotonic() - started
                print(f"SIGTERM -> exit {code} in {took_s:.2f} s")
                assert code == 0
                assert d.events("limits_restored"), d.log_path.read_text()[-2000:]
                assert gpu_limits(sim) == before
    finally:
        broker.stop()
