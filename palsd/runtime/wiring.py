"""Build the daemon's parts from a validated config. The only place adapters meet."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from palsd.act.batch import BatchLimitClient
from palsd.config import PalsdConfig, ServerConfig
from palsd.core.types import Controller, Slo
from palsd.report.metrics import Metrics
from palsd.sense.gpu import GpuBackend

if TYPE_CHECKING:
    from palsd.runtime.daemon import ServerLink


def make_backend(cfg: PalsdConfig) -> GpuBackend:
    if cfg.gpu.backend == "sim":
        from palsd.sense.simhost import SimHostBackend

        assert cfg.gpu.sim_url is not None  # the schema guarantees it
        return SimHostBackend(cfg.gpu.sim_url, cfg.gpu.indices, cfg.gpu.timeout_s)
    from palsd.sense.nvml import NvmlBackend

    return NvmlBackend(cfg.gpu.indices)


def make_controller(cfg: PalsdConfig) -> Controller:
    if cfg.control.controller == "joint":
        from palsd.core.controller import JointController, JointParams

        j = cfg.control.joint
        return JointController(
            JointParams(
                max_raise_w_per_tick=cfg.control.max_raise_w_per_tick,
                host_fixed_w=j.host_fixed_w,
                low_margin=j.low_margin,
                high_margin=j.high_margin,
                dwell_s=j.dwell_s,
                cap_step_w=j.cap_step_w,
                batch_memory_s=j.batch_memory_s,
            )
        )
    from palsd.core.demand_split import DemandSplitController, DemandSplitParams

    return DemandSplitController(
        DemandSplitParams(max_raise_w_per_tick=cfg.control.max_raise_w_per_tick)
    )


def slo_of(server: ServerConfig) -> Slo:
    s = server.slo
    return Slo(
        ttft_s=s.ttft_s,
        ttft_quantile=s.ttft_quantile,
        itl_s=s.itl_s,
        itl_quantile=s.itl_quantile,
        min_generation_tokens_per_s=s.min_generation_tokens_per_s,
    )


def read_secret(path: Path | None) -> str | None:
    if path is None:
        return None
    return path.read_text().strip()


def make_batch_ports(cfg: PalsdConfig) -> dict[str, BatchLimitClient]:
    """Each server's batch-limit endpoint client, by server name. Reads the token files.

    Each client keeps its own connection: close them (`batch_ports` does)."""
    return {
        s.name: BatchLimitClient(s.url, read_secret(s.admin_token_file), cfg.scrape.timeout_s)
        for s in cfg.servers
    }


@contextmanager
def batch_ports(cfg: PalsdConfig) -> Iterator[dict[str, BatchLimitClient]]:
    """make_batch_ports, their connections closed on the way out."""
    ports = make_batch_ports(cfg)
    try:
        yield ports
    finally:
        for port in ports.values():
            port.close()


def make_server_links(
    cfg: PalsdConfig,
    ports: Mapping[str, BatchLimitClient],
    *,
    metrics: Metrics,
    log: Any,
    record_original: Callable[[str, str, int], bool],
) -> list[ServerLink]:
    """Per server: the scrape task (sense) and the batch-limit task (act, over `ports`, the
    same clients that restore the batch limits at exit), both long-lived."""
    from palsd.act.batch_actuator import BatchActuator
    from palsd.runtime.daemon import ServerLink
    from palsd.sense.scraper import ServerScraper
    from palsd.sense.vllm import VllmScraper

    period_s = cfg.control.period_s
    links = []
    for s in cfg.servers:
        failures = metrics.sense_errors.labels(f"server:{s.name}")
        links.append(
            ServerLink(
                name=s.name,
                url=s.url,
                gpu_indices=tuple(s.gpus),
                slo=slo_of(s),
                scraper=ServerScraper(
                    VllmScraper(s.url, cfg.scrape.window_s, cfg.scrape.timeout_s),
                    period_s,
                    on_failure=failures.inc,
                ),
                batch=BatchActuator(
                    s.name,
                    s.url,
                    ports[s.name],
                    log=log,
                    metrics=metrics,
                    record_original=record_original,
                    dry_run=cfg.control.dry_run,
                    poll_s=period_s,
                    min_limit=s.min_batch_limit,
                    max_limit=s.max_batch_limit,
                ),
            )
        )
    return links
