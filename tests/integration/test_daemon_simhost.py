"""palsd end to end against a real `palsd sim-host` process, driven through palsctl."""

from __future__ import annotations

import signal
import subprocess

import httpx

from tests.integration.procs import (
    PALSCTL,
    gpu_limits,
    palsd,
    palsd_config,
    sim_host,
    wait_until,
)


def test_status_lists_every_simulated_gpu_and_server(tmp_path):
    with (
        sim_host(tmp_path, gpus=4, servers=2) as sim,
        palsd(tmp_path, palsd_config(sim, tmp_path)) as d,
    ):
        # Batch limits are read beside the tick (a hung endpoint must not stretch it), so they
        # show up a tick or two after the first decision.
        def with_batch_limits():
            status = d.status()
            return status if all(v["batch_limit"] for v in status["servers"]) else None

        status = wait_until(with_batch_limits, 5, "every server's batch limit in status")
        assert [g["index"] for g in status["gpus"]] == [0, 1, 2, 3]
        for g in status["gpus"]:
            assert g["min_limit_w"] <= g["power_limit_w"] <= g["max_limit_w"]
            assert g["power_w"] is not None
        assert {s["name"] for s in status["servers"]} == {s["name"] for s in sim["servers"]}
        assert all(1 <= s["batch_limit"] <= s["max_num_seqs"] for s in status["servers"])
        assert status["budget"]["source"] == "none"
        assert status["controller"]["last_decision"]["reasons"]
        table = d.palsctl("status")
        assert table.returncode == 0
        for g in status["gpus"]:
            assert g["name"] in table.stdout


def test_lower_budget_applied_within_one_period_and_held(tmp_path):
    with sim_host(tmp_path, gpus=4, servers=2) as sim:
        before = gpu_limits(sim)
        cfg = palsd_config(sim, tmp_path, control={"period_s": 0.5})
        with palsd(tmp_path, cfg) as d:
            budget = sum(before.values()) * 0.6
            set_at = d.events("power_limits_applied")
            proc = d.palsctl("set-budget", f"{budget:.0f}W", "--ttl", "10m")
            assert proc.returncode == 0, proc.stderr
            # Applied on arrival: the daemon's own log records the enforcement, stamped.
            applied = wait_until(
                lambda: [
                    e
                    for e in d.events("power_limits_applied")[len(set_at) :]
                    if e["sum_limit_w"] <= round(budget)
                ],
                2.0,
                "limits under the new budget",
            )
            assert applied[0]["trigger"] == "budget"
            # From then on the simulated GPUs' sum never exceeds it.
            for _ in range(20):
                assert sum(gpu_limits(sim).values()) <= round(budget) + 1e-6
            status = d.status()
            assert status["budget"]["source"] == "override"
            assert status["budget"]["effective_w"] == round(budget)


def test_sigterm_restores_original_limits(tmp_path):
    with sim_host(tmp_path, gpus=4, servers=2) as sim:
        before = gpu_limits(sim)
        cfg = palsd_config(sim, tmp_path, budget={"default_w": sum(before.values()) * 0.5})
        with palsd(tmp_path, cfg) as d:
            wait_until(lambda: gpu_limits(sim) != before, 10, "palsd to change limits")
            assert d.stop(signal.SIGTERM) == 0
        assert gpu_limits(sim) == before
        assert not (tmp_path / "state" / "originals.json").exists()


def test_set_budget_rejects_bad_input_and_daemon_down(tmp_path):
    with (
        sim_host(tmp_path, gpus=2, servers=1) as sim,
        palsd(tmp_path, palsd_config(sim, tmp_path)) as d,
    ):
        bad = d.palsctl("set-budget", "lots")
        assert bad.returncode == 2 and "not a power" in bad.stderr
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket))) as api:
            resp = api.put("http://palsd/v1/budget/override", json={"budget_w": -5})
        assert resp.status_code == 400 and resp.json()["reason"] == "bad_value"
        assert d.status()["budget"]["source"] == "none"
        metrics = httpx.get(f"http://127.0.0.1:{d.metrics_port()}/metrics").text
        assert 'palsd_api_rejected_total{reason="bad_value"} 1.0' in metrics
    gone = subprocess.run(
        [*PALSCTL, "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
    )
    assert gone.returncode == 1 and "cannot reach palsd" in gone.stderr
