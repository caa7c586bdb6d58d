"""SIGHUP reloads the configuration, naming each changed key it applied and each that waits for
a restart; a bad file is rejected with its reasons and the running configuration stays in
force."""

from __future__ import annotations

import signal

import yaml

from tests.integration.procs import palsd, palsd_config, sim_host, wait_until


def test_sighup_applies_a_good_file_and_rejects_a_bad_one(tmp_path):
    with sim_host(tmp_path, gpus=2, servers=1) as sim:
        cfg = palsd_config(sim, tmp_path, budget={"default_w": 1200})
        with palsd(tmp_path, cfg) as d:
            assert d.status()["budget"]["effective_w"] == 1200
            cfg["budget"]["default_w"] = 900
            cfg["scrape"] = {"window_s": 5.0}  # waits for a restart, and the reload says so
            d.config.write_text(yaml.safe_dump(cfg))
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: d.status()["budget"]["effective_w"] == 900, 5, "reloaded budget")
            reloaded = wait_until(lambda: d.events("config_reloaded"), 5, "reload event")
            assert reloaded[0]["applied"] == ["budget.default_w"]
            assert reloaded[0]["needs_restart"] == ["scrape.window_s"]
            d.proc.send_signal(signal.SIGHUP)  # the same file again: still not in force
            again = wait_until(lambda: d.events("config_reloaded")[1:], 5, "second reload")
            assert again[0]["applied"] == [] and again[0]["needs_restart"] == ["scrape.window_s"]

            d.config.write_text("budget:\n  default_w: -3\ncontrol:\n  period_s: fast\n")
            d.proc.send_signal(signal.SIGHUP)
            rejected = wait_until(lambda: d.events("config_reload_rejected"), 5, "rejection")
            problems = "\n".join(rejected[0]["problems"])
            assert "budget.default_w" in problems and "control.period_s" in problems
            assert d.status()["budget"]["effective_w"] == 900
            assert d.proc.poll() is None


def test_a_reload_under_run_dry_run_keeps_dry_run_and_asks_for_no_restart(tmp_path):
    # The file says nothing of dry_run (false); `palsd run --dry-run` holds it on, and a reload
    # of the unchanged file must neither turn it off nor ask for a restart to do so.
    with sim_host(tmp_path, gpus=2, servers=1) as sim:
        cfg = palsd_config(sim, tmp_path, budget={"default_w": 1200})
        with palsd(tmp_path, cfg, args=("--dry-run",)) as d:
            wait_until(lambda: d.status()["budget"]["effective_w"] == 1200, 5, "started")
            d.proc.send_signal(signal.SIGHUP)
            reloaded = wait_until(lambda: d.events("config_reloaded"), 5, "reload event")
            assert reloaded[0]["applied"] == [] and reloaded[0]["needs_restart"] == []
            assert d.status()["controller"]["dry_run"] is True
