"""probe-vllm's output from a window report: the JSON shape operators script against, the
text a person reads, and its argument checks."""

from __future__ import annotations

import argparse
import json

import pytest

from palsd.core.types import Quantiles, ServerSignals
from palsd.sense.probe_cli import add_arguments, report_json, report_text
from palsd.sense.signals import EngineSignals, WindowReport

BUSY = ServerSignals(
    running=3, waiting=1, kv_cache_usage=0.25, requests_per_s=2.0, prompt_tokens_per_s=40.0,
    generation_tokens_per_s=300.0, preemptions_per_s=0.0,
    ttft_s=Quantiles(0.05, 0.09, 0.2), itl_s=Quantiles(0.01, 0.02, 0.03), window_s=2.0,
)  # fmt: skip
IDLE = ServerSignals(
    running=0, waiting=0, kv_cache_usage=None, requests_per_s=0.0, prompt_tokens_per_s=0.0,
    generation_tokens_per_s=0.0, preemptions_per_s=0.0, window_s=2.0,
)  # fmt: skip
REPORT = WindowReport(
    server=BUSY, engines=(EngineSignals("m", "0", BUSY), EngineSignals("m", "1", IDLE))
)
KEYS = {
    "model_name", "engine", "running", "waiting", "kv_cache_usage", "requests_per_s",
    "prompt_tokens_per_s", "generation_tokens_per_s", "preemptions_per_s",
    "ttft_s", "itl_s", "e2e_s",
}  # fmt: skip


def test_json_lists_every_engine_with_all_fields() -> None:
    out = json.loads(json.dumps(report_json("http://h:8000", REPORT)))
    assert [(s["model_name"], s["engine"]) for s in out["servers"]] == [("m", "0"), ("m", "1")]
    assert all(set(s) == KEYS for s in out["servers"])
    busy, idle = out["servers"]
    assert busy["ttft_s"] == {"p50": 0.05, "p90": 0.09, "p99": 0.2}
    assert idle["e2e_s"] == {"p50": None, "p90": None, "p99": None}
    assert idle["kv_cache_usage"] is None
    assert out["window_s"] == 2.0


def test_text_shows_each_engine_and_marks_missing_quantiles() -> None:
    text = report_text("http://h:8000", REPORT)
    assert "model 'm' engine 0:" in text and "model 'm' engine 1:" in text
    assert "ttft ms  p50 50.0  p90 90.0  p99 200.0" in text
    assert "e2e  ms  p50 -  p90 -  p99 -" in text
    assert "kv cache 25.0%" in text and "kv cache not reported" in text
    assert text.endswith("(- : no request finished in the window)")


def test_text_with_every_quantile_known_prints_no_legend_for_dashes() -> None:
    full = ServerSignals(
        running=1, waiting=0, kv_cache_usage=0.5, requests_per_s=1.0, prompt_tokens_per_s=9.0,
        generation_tokens_per_s=90.0, preemptions_per_s=0.0, ttft_s=Quantiles(0.1, 0.2, 0.3),
        itl_s=Quantiles(0.01, 0.02, 0.03), e2e_s=Quantiles(1.0, 2.0, 3.0), window_s=2.0,
    )  # fmt: skip
    text = report_text("http://h:8000", WindowReport(full, (EngineSignals("m", "0", full),)))
    assert "e2e  ms  p50 1000.0  p90 2000.0  p99 3000.0" in text
    assert " - " not in text and "no request finished" not in text


@pytest.mark.parametrize("bad", ["0s", "soon", "-1s"])
def test_interval_must_be_a_positive_duration(bad: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["http://h", "--interval", bad])
    assert parser.parse_args(["http://h", "--interval", "500ms"]).interval == 0.5
