"""Plain-value builders for controller tests: observations as a real daemon would sense them."""

from __future__ import annotations

from palsd.core.types import (
    BudgetInForce,
    BudgetSource,
    GpuObservation,
    Observation,
    Quantiles,
    ServerObservation,
    ServerSignals,
    Slo,
)

SLO = Slo(ttft_s=2.0, ttft_quantile=0.9, itl_s=0.1, itl_quantile=0.9)


def gpu(
    index: int,
    power_w: float | None = 300.0,
    limit_w: float = 700.0,
    min_w: float = 200.0,
    max_w: float = 700.0,
) -> GpuObservation:
    return GpuObservation(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index}",
        power_w=power_w,
        power_instant_w=power_w,
        energy_j=None,
        power_limit_w=limit_w,
        enforced_limit_w=limit_w,
        min_limit_w=min_w,
        max_limit_w=max_w,
        default_limit_w=max_w,
    )


def signals(
    itl_s: float | None = 0.05,
    ttft_s: float | None = 0.5,
    running: float = 32,
    waiting: float = 0,
    requests_per_s: float = 4.0,
) -> ServerSignals:
    return ServerSignals(
        running=running,
        waiting=waiting,
        kv_cache_usage=0.3,
        requests_per_s=requests_per_s,
        prompt_tokens_per_s=requests_per_s * 500,
        generation_tokens_per_s=requests_per_s * 250,
        preemptions_per_s=0.0,
        ttft_s=Quantiles(p50=ttft_s, p90=ttft_s, p99=ttft_s),
        itl_s=Quantiles(p50=itl_s, p90=itl_s, p99=itl_s),
        window_s=5.0,
    )


def server(
    name: str,
    gpus: tuple[int, ...],
    sig: ServerSignals | None,
    batch_limit: int | None = 64,
    max_num_seqs: int = 256,
    slo: Slo = SLO,
) -> ServerObservation:
    return ServerObservation(
        name=name,
        url=f"sim://{name}",
        gpu_indices=gpus,
        slo=slo,
        signals=sig,
        batch_limit=batch_limit,
        max_num_seqs=max_num_seqs,
    )


def obs(
    now_s: float,
    gpus: list[GpuObservation],
    servers: list[ServerObservation],
    budget_w: float | None = None,
) -> Observation:
    source = BudgetSource.NONE if budget_w is None else BudgetSource.FACILITY
    return Observation(
        now_s=now_s,
        gpus=tuple(gpus),
        servers=tuple(servers),
        budget=BudgetInForce(effective_w=budget_w, source=source),
    )
