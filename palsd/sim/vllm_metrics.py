"""Render one simulated server's state as vLLM 0.32 /metrics text (Prometheus exposition).

Names, labels (model_name, engine) and default histogram buckets follow a live vLLM 0.32.0
server (see docs/simhost.md); counters carry `_total`, and every counter and histogram has a
`_created` gauge as vLLM's single-API-server mode exposes.
"""

from __future__ import annotations

import math
from itertools import accumulate

from palsd.sense.vllm_metrics import EngineKey, EngineSample
from palsd.sense.vllm_metrics import Histogram as ScrapedHistogram
from palsd.sim.records import Histogram
from palsd.sim.server_model import ServerSim


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{float(value):.1f}"
    return repr(float(value))


def _labels(model_name: str, extra: dict[str, str] | None = None) -> str:
    # sorted by label name, as prometheus_client writes them
    labels = {"engine": "0", "model_name": model_name, **(extra or {})}
    return "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


def _scraped(h: Histogram) -> ScrapedHistogram:
    # cumulative counts, summed left to right as the page's buckets are (the last: +Inf)
    cumulative = list(accumulate(h.counts))
    buckets = tuple(zip((*h.bounds, math.inf), cumulative, strict=True))
    return ScrapedHistogram(buckets=buckets, count=cumulative[-1], sum_s=h.sum)


def engine_samples(
    server: ServerSim, model_name: str, e2e: bool = True
) -> dict[EngineKey, EngineSample]:
    """What `palsd.sense.vllm_metrics.parse_metrics(render_metrics(server, ...))` returns,
    built without the text round trip (a page costs ~10 ms to parse; the simulation scrapes
    every server every tick). tests/unit/test_simulate.py asserts the two are equal. Without
    the e2e latency histogram when `e2e` is False (the controller reads no e2e quantile)."""
    s = server
    sample = EngineSample(
        model_name=model_name,
        engine="0",
        running=float(s.running),
        waiting=float(s.pending_waiting),
        kv_cache_usage=float(s.kv_usage),
        prompt_tokens=float(s.prompt_tokens_total),
        generation_tokens=float(s.generation_tokens_total),
        preemptions=float(s.preemptions_total),
        requests_finished=float(
            sum(
                s.success_total.get(r, 0)
                for r in ("stop", "length", "abort", "error", "repetition")
            )
        ),
        ttft=_scraped(s.h_ttft),
        itl=_scraped(s.h_itl),
        e2e=_scraped(s.h_e2e) if e2e else None,
    )
    return {sample.key: sample}


def render_metrics(server: ServerSim, model_name: str, created_s: float) -> str:
    base = model_name
    lines: list[str] = []
    add = lines.append

    def gauge(name: str, help_: str, samples: list[tuple[dict[str, str] | None, float]]) -> None:
        add(f"# HELP {name} {help_}")
        add(f"# TYPE {name} gauge")
        for extra, value in samples:
            add(f"{name}{_labels(base, extra)} {_fmt(value)}")

    def counter(name: str, help_: str, samples: list[tuple[dict[str, str] | None, float]]) -> None:
        add(f"# HELP {name}_total {help_}")
        add(f"# TYPE {name}_total counter")
        for extra, value in samples:
            add(f"{name}_total{_labels(base, extra)} {_fmt(value)}")
        add(f"# HELP {name}_created {help_}")
        add(f"# TYPE {name}_created gauge")
        for extra, _ in samples:
            add(f"{name}_created{_labels(base, extra)} {_fmt(created_s)}")

    def histogram(name: str, help_: str, h: Histogram) -> None:
        add(f"# HELP {name} {help_}")
        add(f"# TYPE {name} histogram")
        acc = 0.0
        for bound, count in zip(h.bounds, h.counts, strict=False):
            acc += count
            add(f"{name}_bucket{_labels(base, {'le': _fmt(bound)})} {_fmt(acc)}")
        acc += h.counts[-1]
        add(f"{name}_bucket{_labels(base, {'le': '+Inf'})} {_fmt(acc)}")
        add(f"{name}_count{_labels(base)} {_fmt(acc)}")
        add(f"{name}_sum{_labels(base)} {_fmt(h.sum)}")
        add(f"# HELP {name}_created {help_}")
        add(f"# TYPE {name}_created gauge")
        add(f"{name}_created{_labels(base)} {_fmt(created_s)}")

    s = server
    waiting = s.pending_waiting
    gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [(None, s.running)],
    )
    gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [(None, waiting)],
    )
    # capacity: blocked by KV space or the batch limit; deferred is not modelled
    gauge(
        "vllm:num_requests_waiting_by_reason",
        "Number of requests waiting, by reason.",
        [({"reason": "capacity"}, waiting), ({"reason": "deferred"}, 0)],
    )
    gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        [(None, s.kv_usage)],
    )
    gauge(
        "vllm:engine_sleep_state",
        "Engine sleep state; awake = 0 means engine is sleeping.",
        [
            ({"sleep_state": "awake"}, 1),
            ({"sleep_state": "weights_offloaded"}, 0),
            ({"sleep_state": "discard_all"}, 0),
        ],
    )
    add("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    add("# TYPE vllm:cache_config_info gauge")
    config = {
        "block_size": "16",
        "cache_dtype": "auto",
        "gpu_memory_utilization": "0.9",
        "num_gpu_blocks": str(s.kv_capacity // 16),
    }
    add(f"vllm:cache_config_info{_labels(base, config)} 1.0")
    counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        [(None, s.preemptions_total)],
    )
    counter(
        "vllm:prompt_tokens", "Number of prefill tokens processed.", [(None, s.prompt_tokens_total)]
    )
    counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        [(None, s.generation_tokens_total)],
    )
    counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        [
            ({"finished_reason": r}, s.success_total.get(r, 0))
            for r in ("stop", "length", "abort", "error", "repetition")
        ],
    )
    counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of tokens.",
        [(None, s.prompt_tokens_total)],
    )
    counter(
        "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of tokens.", [(None, 0)]
    )
    histogram(
        "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.h_ttft
    )
    histogram(
        "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", s.h_itl
    )
    histogram(
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        s.h_tpot,
    )
    histogram(
        "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", s.h_e2e
    )
    histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        s.h_queue,
    )
    histogram(
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        s.h_inference,
    )
    histogram(
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        s.h_prefill,
    )
    histogram(
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        s.h_decode,
    )
    histogram(
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        s.h_iter_tokens,
    )
    histogram(
        "vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.h_prompt_tokens
    )
    histogram(
        "vllm:request_generation_tokens", "Number of generation tokens processed.", s.h_gen_tokens
    )
    # every simulated request asks for exactly the tokens it generates (finished by length) and
    # nothing is served from a prefix cache, so these repeat the two histograms above
    histogram(
        "vllm:request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
        s.h_gen_tokens,
    )
    histogram(
        "vllm:request_max_num_generation_tokens",
        "Histogram of maximum number of requested generation tokens.",
        s.h_gen_tokens,
    )
    histogram(
        "vllm:request_prefill_kv_computed_tokens",
        "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
        s.h_prompt_tokens,
    )
    return "\n".join(lines) + "\n"
