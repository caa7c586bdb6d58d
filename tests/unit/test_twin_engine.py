"""The twin engine, driven in virtual time with plain values: no clock, no mocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from palsd.sim.engine import TwinHost
from palsd.sim.gpu_model import H100, GpuState
from palsd.sim.models import MIXTRAL_8X7B, MODEL_PRESETS, QWEN_MOE, CostModel, iteration_cost
from palsd.sim.records import ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS, weighted_quantiles
from palsd.sim.workload import (
    Arrival,
    ArrivalStream,
    BacklogWorkload,
    BurstyWorkload,
    LengthDist,
    PoissonWorkload,
    VaryingWorkload,
)


def take(stream: ArrivalStream, n: int) -> list[Arrival]:
    out = []
    for _ in range(n):
        assert stream.peek(1e9) is not None
        out.append(stream.pop())
    return out


def busy_host(**kw: object) -> TwinHost:
    return TwinHost(n_gpus=2, workload=BacklogWorkload(), **kw)  # type: ignore[arg-type]


def test_time_moves_only_through_step() -> None:
    host = TwinHost(n_gpus=2)
    assert host.now_s == 0.0
    host.step(0.0)
    assert host.now_s == 0.0
    host.step(1.25)
    host.step(0.75)
    assert host.now_s == pytest.approx(2.0)


def test_same_seed_same_run_and_other_seed_differs() -> None:
    a, b, c = (TwinHost(n_gpus=4, seed=s) for s in (1, 1, 2))
    for h in (a, b, c):
        h.step(60)
    assert a.energy_j_total() == b.energy_j_total()
    assert a.tokens_generated_total(0) == b.tokens_generated_total(0)
    assert a.tokens_generated_total(0) != c.tokens_generated_total(0)


def test_servers_split_gpus_by_tp() -> None:
    host = TwinHost(n_gpus=8, model="mixtral-8x7b")
    assert [s.gpu_indices for s in host.servers] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert len(TwinHost(n_gpus=8, model="qwen-moe").servers) == 8
    with pytest.raises(ValueError, match="multiple of TP"):
        TwinHost(n_gpus=3, model="mixtral-8x7b")


def test_power_limit_outside_range_names_the_range_and_changes_nothing() -> None:
    host = TwinHost(n_gpus=2)
    with pytest.raises(ValueError, match=r"\[200, 700\]"):
        host.set_power_limit_w(0, 150)
    with pytest.raises(ValueError, match=r"\[200, 700\]"):
        host.set_power_limit_w(0, 701)
    with pytest.raises(IndexError):
        host.set_power_limit_w(2, 300)
    assert host.gpu_readings()[0].power_limit_w == 700
    host.set_power_limit_w(1, 300)
    assert host.gpu_readings()[1].power_limit_w == 300


@pytest.mark.parametrize("bad", [0, -1, 257, 3.0, True, "8", None])
def test_bad_batch_limit_rejected_and_nothing_changes(bad: object) -> None:
    host = TwinHost(n_gpus=2)
    with pytest.raises(ValueError):
        host.set_batch_limit(0, bad)  # type: ignore[arg-type]
    assert host.batch_state(0)["limit"] == 256


def test_lower_batch_limit_gates_admission_without_preempting() -> None:
    host = busy_host()
    host.step(10)
    before = host.batch_state(0)
    assert before["running"] >= 250 and before["waiting"] > 0
    preempted = host.server_signals(0, 10).preemptions_per_s
    host.set_batch_limit(0, 16)
    assert host.batch_state(0)["running"] == before["running"]  # nothing is evicted for it
    host.step(120)
    state = host.batch_state(0)
    assert state["limit"] == 16 and state["running"] <= 16
    assert host.server_signals(0, 60).preemptions_per_s == preempted == 0


def test_power_cap_lowers_clock_after_settling() -> None:
    host = busy_host(model="dense-8b")
    host.step(5)
    hot = host.gpu_readings()[0]
    assert hot.power_instant_w is not None and hot.power_instant_w > 400
    host.set_power_limit_w(0, 250)
    host.step(0.05)
    assert host.gpu_readings()[0].power_instant_w > 260  # type: ignore[operator]  # settling
    host.step(3)
    cool = host.gpu_readings()[0]
    assert cool.power_instant_w is not None and cool.power_instant_w <= 250 * 1.04
    assert cool.sm_clock_mhz is not None and cool.sm_clock_mhz < H100.max_clock_mhz * 0.9
    assert cool.power_w is not None and cool.power_w <= 250 * 1.04


def test_energy_counter_matches_average_power() -> None:
    host = busy_host()
    host.step(10)
    e0 = host.gpu_readings()[0].energy_j
    host.step(1)
    g = host.gpu_readings()[0]
    assert g.energy_j is not None and e0 is not None and g.power_w is not None
    assert g.energy_j - e0 == pytest.approx(g.power_w, rel=0.02)
    assert host.energy_j_total() == pytest.approx(
        sum(x.energy_j or 0 for x in host.gpu_readings()), rel=1e-6
    )


def test_nvml_average_moves_in_100ms_steps_over_one_second() -> None:
    gpu = GpuState(H100, 0)
    for _ in range(20):
        gpu.account(0.05, 0.0, 0.0, 0.0, H100.max_clock_mhz)
    idle = gpu.power_avg_w
    seen = []
    for _ in range(24):
        gpu.account(0.05, 0.05, 0.3, 0.9, H100.max_clock_mhz)
        seen.append(gpu.power_avg_w)
    assert gpu.power_instant_w > idle + 300  # the instant reading jumps at once
    assert seen[0] == idle  # the first 50 ms do not complete a 100 ms bin
    assert seen[1] > idle and seen[2] == seen[1]  # then it moves once per 100 ms
    assert seen[17] < gpu.power_instant_w - 1 and seen[19] == pytest.approx(gpu.power_instant_w)


def test_preemption_when_kv_cache_runs_out_and_every_token_is_counted() -> None:
    long = PoissonWorkload(
        lambda t: 40.0 if t < 4 else 0.0,
        prompt=LengthDist(6000, 0.1, 4000, 8000),
        output=LengthDist(1500, 0.1, 1000, 2000),
        rate_max_per_s=40.0,
    )
    host = TwinHost(gpu="h100", model="qwen-moe", n_gpus=1, workload=long)
    host.step(900)
    records = host.request_records(0)
    assert host.batch_state(0) == {"max_num_seqs": 256, "limit": 256, "running": 0, "waiting": 0}
    assert sum(r.preemptions for r in records) > 0
    assert "vllm:num_preemptions_total" in host.metrics_text(0)
    assert host.tokens_generated_total(0) == sum(r.output_tokens for r in records)
    assert all(r.arrival_s <= r.first_token_s <= r.finish_s for r in records)


def test_moe_touches_expected_experts() -> None:
    assert MIXTRAL_8X7B.experts_touched(1) == pytest.approx(2.0)
    assert MIXTRAL_8X7B.experts_touched(64) == pytest.approx(8.0, abs=1e-6)
    assert QWEN_MOE.experts_touched(8) == pytest.approx(60 * (1 - (1 - 4 / 60) ** 8))


def test_metrics_text_is_vllm_shaped() -> None:
    host = TwinHost(n_gpus=2)
    host.step(30)
    fams = {f.name: f for f in text_string_to_metric_families(host.metrics_text(0))}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens",
        "vllm:prompt_tokens",
        "vllm:num_preemptions",
        "vllm:request_success",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:generation_tokens_created",
    ):
        assert name in fams, name
    for fam in fams.values():
        for s in fam.samples:
            if fam.name != "vllm:cache_config_info":
                assert s.labels["model_name"] == MIXTRAL_8X7B.name and s.labels["engine"] == "0"
    gen = fams["vllm:generation_tokens"].samples[0]
    assert gen.name == "vllm:generation_tokens_total"
    assert gen.value == host.tokens_generated_total(0)

    def bounds(family: str) -> tuple[float, ...]:
        return tuple(
            float(s.labels["le"])
            for s in fams[family].samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
        )

    assert bounds("vllm:time_to_first_token_seconds") == TTFT_BUCKETS
    assert bounds("vllm:inter_token_latency_seconds") == ITL_BUCKETS
    assert bounds("vllm:e2e_request_latency_seconds") == REQUEST_BUCKETS
    assert TTFT_BUCKETS[-3:] == (160.0, 640.0, 2560.0)


def test_server_signals_agree_with_counters() -> None:
    host = TwinHost(n_gpus=2, workload=PoissonWorkload(5.0))
    host.step(60)
    t0 = host.tokens_generated_total(0)
    host.step(10)
    sig = host.server_signals(0, 10)
    assert sig.generation_tokens_per_s == pytest.approx(
        (host.tokens_generated_total(0) - t0) / 10, rel=1e-6
    )
    assert sig.window_s == pytest.approx(10)
    assert sig.ttft_s.p50 is not None and sig.ttft_s.p50 <= (sig.ttft_s.p99 or 0)
    assert sig.itl_s.p90 is not None and 0.005 < sig.itl_s.p90 < 0.1
    assert 2.0 < sig.requests_per_s < 9.0


def test_poisson_rate_and_seeded_streams() -> None:
    w = PoissonWorkload(4.0)
    s1, s2, s3 = w.stream(0, 7), w.stream(0, 7), w.stream(1, 7)
    a = take(s1, 4000)
    assert a == take(s2, 4000)
    assert a[:5] != take(s3, 5)
    assert 4000 / a[-1].arrival_s == pytest.approx(4.0, rel=0.06)


def test_arrivals_do_not_depend_on_how_time_is_sliced() -> None:
    w = PoissonWorkload(lambda t: 3.0 if t < 50 else 0.0, rate_max_per_s=3.0)
    whole = w.stream(0, 5)
    once: list[Arrival] = []
    while whole.peek(10_000.0) is not None:  # a rate that drops to zero for good ends it
        once.append(whole.pop())
    sliced = w.stream(0, 5)
    got: list[Arrival] = []
    t = 0.0
    while t < 10_000.0:
        t += 0.37
        while sliced.peek(t) is not None:
            got.append(sliced.pop())
    assert got == once and 100 < len(once) < 200


def test_time_varying_and_bursty_rates() -> None:
    step = PoissonWorkload(lambda t: 1.0 if t < 500 else 8.0, rate_max_per_s=8.0).stream(0, 1)
    times = [a.arrival_s for a in take(step, 3000)]
    early = sum(1 for t in times if t < 500)
    late = sum(1 for t in times if 500 <= t < 700)
    assert early / 500 == pytest.approx(1.0, rel=0.2)
    assert late / 200 == pytest.approx(8.0, rel=0.15)
    bursty = BurstyWorkload()
    bs = bursty.stream(0, 3)
    bt = [a.arrival_s for a in take(bs, 20000)]
    assert 20000 / bt[-1] == pytest.approx(bursty.mean_rate_per_s, rel=0.15)
    varying = VaryingWorkload(4.0, period_s=600).stream(0, 0)
    vt = [a.arrival_s for a in take(varying, 5000)]
    in_trough = sum(1 for t in vt if 400 <= t < 500)
    at_peak = sum(1 for t in vt if 100 <= t < 200)
    assert at_peak > 3 * in_trough


@pytest.mark.parametrize(
    ("samples", "want"),
    [
        ([], [None, None, None]),
        ([(0.2, 1.0)], [0.2, 0.2, 0.2]),
        ([(0.1, 1.0), (0.3, 1.0), (0.2, 1.0), (0.4, 1.0)], [0.2, 0.4, 0.4]),
        ([(0.01, 90.0), (1.0, 10.0)], [0.01, 0.01, 1.0]),  # weights are token counts
    ],
)
def test_weighted_quantiles(samples: list[tuple[float, float]], want: list[float | None]) -> None:
    assert weighted_quantiles(samples, (0.5, 0.9, 0.99)) == want


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.01, 3.0), st.integers(0, 1), st.floats(200, 700), st.integers(1, 256)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_counters_never_run_backwards_whatever_the_knobs_do(
    actions: list[tuple[float, int, float, int]],
) -> None:
    host = TwinHost(n_gpus=2, workload=PoissonWorkload(12.0), seed=4)
    energy = tokens = 0.0
    for dt, gpu, cap, limit in actions:
        host.set_power_limit_w(gpu, cap)
        host.set_batch_limit(0, limit)
        host.step(dt)
        state = host.batch_state(0)
        assert state["limit"] == limit and state["running"] <= 256
        assert host.energy_j_total() >= energy and host.tokens_generated_total(0) >= tokens
        energy, tokens = host.energy_j_total(), host.tokens_generated_total(0)
        for g in host.gpu_readings():
            assert g.power_w is not None and 70 <= g.power_w <= 700 * 1.3
            assert g.sm_clock_mhz is not None and 0 < g.sm_clock_mhz <= H100.max_clock_mhz
        sig = host.server_signals(0, 1.0)
        assert sig.kv_cache_usage is not None and 0 <= sig.kv_cache_usage <= 1


@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen-moe", "dense-8b"])
@pytest.mark.parametrize("clock", [700.0, 1400.0, 1980.0])
def test_engine_cost_model_equals_the_reference_roofline(model: str, clock: float) -> None:
    spec = MODEL_PRESETS[model]
    fast = CostModel(spec, H100, spec.default_tp)
    fast.set_clock(clock)
    for dec, ctx, pre, att in [(1, 500, 0, 0.0), (64, 64_000, 0, 0.0), (8, 9000, 2048, 3e6)]:
        ref = iteration_cost(spec, H100, spec.default_tp, clock, dec, ctx, pre, att)
        assert fast.cost(dec, ctx, pre, att) == pytest.approx(
            (ref.time_s, ref.mem_s, ref.comp_s), rel=1e-9
        )


def test_without_records_the_counters_and_signals_still_count() -> None:
    kept, lean = (TwinHost(n_gpus=2, seed=2, keep_records=k) for k in (True, False))
    for h in (kept, lean):
        h.step(60)
    assert lean.request_records(0) == [] and len(kept.request_records(0)) > 50
    assert lean.server_signals(0, 30) == kept.server_signals(0, 30)
    assert lean.metrics_text(0) == kept.metrics_text(0)
