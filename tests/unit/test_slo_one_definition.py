"""One definition of "SLO met" (palsd/core/slo.py), asked by the controller, status and metrics.

The input below is one on which report/status.py and core/slo.py used to disagree: status
checked the throughput floor only while requests were waiting and read a missing p50 as "not
measured"; the controller counts running requests as demand too, and falls back to p90.
"""

from __future__ import annotations

from palsd.core.slo import headroom, slo_met
from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    Decision,
    Quantiles,
    ServerObservation,
    ServerSignals,
    Slo,
)
from palsd.report.metrics import Metrics
from palsd.report.status import server_status

SLO = Slo(ttft_s=1.0, ttft_quantile=0.5, min_generation_tokens_per_s=100.0)
SIGNALS = ServerSignals(
    running=4,
    waiting=0,  # busy, nobody queued
    kv_cache_usage=0.3,
    requests_per_s=1.0,
    prompt_tokens_per_s=100.0,
    generation_tokens_per_s=50.0,  # half the floor
    preemptions_per_s=0.0,
    ttft_s=Quantiles(p50=None, p90=2.0, p99=3.0),  # no p50 in the window
)


def observation(signals: ServerSignals | None) -> ServerObservation:
    return ServerObservation("s0", "http://s0", (0,), SLO, signals, 8, 8)


def test_status_metrics_and_controller_give_one_answer_on_the_input_they_disagreed_on():
    assert headroom(SLO, SIGNALS).meets() is False  # what the controller acts on
    assert slo_met(SLO, SIGNALS) is False
    assert server_status(observation(SIGNALS), None)["slo_met"] is False
    metrics = Metrics()
    decision = Decision({}, {}, (), "hold")
    budget = BudgetInForce(None, BudgetSource.NONE)
    metrics.report_tick(budget, decision, (), (observation(SIGNALS),), 0.0)
    assert metrics.registry.get_sample_value("palsd_server_slo_met", {"server": "s0"}) == 0.0


def test_no_signals_is_unknown_everywhere_and_idle_is_met():
    assert slo_met(SLO, None) is None
    assert server_status(observation(None), None)["slo_met"] is None
    idle = ServerSignals(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert slo_met(SLO, idle) is True  # nothing asked, nothing missed
    assert server_status(observation(idle), None)["slo_met"] is True
