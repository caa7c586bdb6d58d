"""Issue 13 item 4 on the simulated host: at a fixed infeasible budget the batch limit settles.

palsd runs as a process against `palsd sim-host` over HTTP, with a budget below what the GPUs
draw at their floor, and requests always waiting. The server's own batch limit (its
/pals/v1/batch-limit answer, not palsd's view of it) is sampled for two minutes after a settling
period; the shed and grow rules share one hysteresis, so it may turn at most once a minute. The
flip-flop this guards against turned every 1.5-3 s.
"""

from __future__ import annotations

import time

import httpx

from tests.integration.procs import palsd, palsd_config, sim_host, wait_until
from tests.unit.test_controller_hysteresis import reversals_per_window

SETTLE_S = 20.0
WATCH_S = 120.0
SAMPLE_S = 0.25


def test_batch_limit_settles_at_a_fixed_infeasible_budget(tmp_path):
    # Two H100s (floor 200 W each) serving Mixtral at TP=2, arrivals well above what the server
    # finishes, so requests always wait and the grow rule always has a reason to raise.
    with sim_host(tmp_path, 2, 1, "--workload", "poisson", "--rate", "12") as sim:
        url = sim["servers"][0]["url"]
        cfg = palsd_config(sim, tmp_path, control={"period_s": 0.5}, budget={"default_w": 300.0})
        with palsd(tmp_path, cfg) as d, httpx.Client(timeout=5.0) as client:

            def infeasible():
                last = d.status()["controller"]["last_decision"]
                return last if last and last["mode"] == "infeasible" else None

            wait_until(infeasible, 30, "the controller to call the budget infeasible")
            time.sleep(SETTLE_S)
            samples: list[tuple[float, int]] = []
            start = time.monotonic()
            while (now := time.monotonic()) - start < WATCH_S:
                answer = client.get(f"{url}/pals/v1/batch-limit")
                assert answer.status_code == 200, answer.text
                samples.append((now - start, int(answer.json()["limit"])))
                time.sleep(SAMPLE_S)
            last = d.status()["controller"]["last_decision"]

    limits = [b for _, b in samples]
    assert len(samples) >= WATCH_S / SAMPLE_S / 4, "too few samples to judge"
    assert last["mode"] == "infeasible", last
    # The regime under test is engaged: palsd shed the limit below vLLM's default of 256.
    assert max(limits) < 256, limits
    assert reversals_per_window(samples, 60.0) <= 1, f"batch limit cycles: {samples}"
