"""TwinHost: N simulated GPUs and M vLLM-like servers in virtual time.

The only way time moves is `step(dt_s)`; nothing here reads a clock, so the same engine runs
under the real-time shell (`palsd sim-host`) and in the virtual-time runner (`palsd simulate`).
Internally time advances in quanta of at most `quantum_s` (100 ms, one NVML bin): in each
quantum every server runs its iterations at its group's clock, then every GPU is charged the
energy of that work and its power-cap loop moves the clock for the next quantum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from palsd.core.types import GpuObservation, Quantiles, ServerSignals
from palsd.sim.gpu_model import GPU_PRESETS, GpuState
from palsd.sim.models import MODEL_PRESETS
from palsd.sim.records import RequestRecord, weighted_quantiles
from palsd.sim.server_model import ServerSim
from palsd.sim.vllm_metrics import engine_samples, render_metrics
from palsd.sim.workload import PoissonWorkload, Workload

# Requests/s per server used when no workload is given: about half of what one server of the
# preset sustains at batch 64 on an H100 with the default length mix.
NOMINAL_RATE_PER_S = {"mixtral-8x7b": 4.0, "qwen-moe": 6.0, "dense-8b": 6.0, "dense-70b": 1.0}

_SNAPSHOT_KEEP = 20_000  # counter snapshots kept per server (one per quantum: ~16 min)


@dataclass(frozen=True)
class ServerInfo:
    index: int
    name: str
    gpu_indices: tuple[int, ...]
    max_num_seqs: int
    model_name: str


class TwinHost:
    def __init__(
        self,
        gpu: str = "h100",
        model: str = "mixtral-8x7b",
        n_gpus: int = 8,
        workload: Workload | None = None,
        seed: int = 0,
        max_num_seqs: int = 256,
        initial_batch_limit: int | None = None,
        tp: int | None = None,
        quantum_s: float = 0.1,
        max_batched_tokens: int = 8192,
        history_s: float = 900.0,
        epoch_s: float = 0.0,
        keep_records: bool = True,
        metrics_page: bool = True,
    ) -> None:
        if gpu not in GPU_PRESETS:
            raise ValueError(f"unknown gpu {gpu!r}; choose one of {sorted(GPU_PRESETS)}")
        if model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODEL_PRESETS)}")
        spec = GPU_PRESETS[gpu]
        mspec = MODEL_PRESETS[model]
        tp = tp or mspec.default_tp
        if n_gpus < 1 or n_gpus % tp:
            raise ValueError(f"n_gpus {n_gpus} is not a positive multiple of TP {tp}")
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        limit = max_num_seqs if initial_batch_limit is None else initial_batch_limit
        if not 1 <= limit <= max_num_seqs:
            raise ValueError(f"initial_batch_limit {limit} outside [1, {max_num_seqs}]")
        self.gpu_spec = spec
        self.model_spec = mspec
        self.model_key = model
        self.tp = tp
        self.quantum_s = quantum_s
        self.epoch_s = epoch_s  # added to _created gauges (the shell passes wall time at start)
        self.now_s = 0.0
        self.workload: Workload = workload or PoissonWorkload(NOMINAL_RATE_PER_S[model])
        self._gpus = [GpuState(spec, i) for i in range(n_gpus)]
        self._servers: list[ServerSim] = []
        self.servers: list[ServerInfo] = []
        for k in range(n_gpus // tp):
            indices = tuple(range(k * tp, (k + 1) * tp))
            sim = ServerSim(
                k,
                f"vllm-{k}",
                indices,
                mspec,
                spec,
                self.workload.stream(k, seed),
                max_num_seqs,
                limit,
                max_batched_tokens,
                history_s,
                keep_records,
                metrics_page,
            )
            self._servers.append(sim)
            self.servers.append(ServerInfo(k, sim.name, indices, max_num_seqs, mspec.name))
        self._groups = [[self._gpus[i] for i in srv.gpu_indices] for srv in self._servers]
        # per server: (t, prompt, generation, finished, preemptions) after each quantum
        self._snapshots: list[list[tuple[float, int, int, int, int]]] = [
            [(0.0, 0, 0, 0, 0)] for _ in self._servers
        ]

    # ---- time ---------------------------------------------------------------------------------
    def step(self, dt_s: float) -> None:
        """Advance virtual time by dt_s (any size; split into quanta internally)."""
        if dt_s < 0:
            raise ValueError("dt_s must be >= 0")
        end = self.now_s + dt_s
        while self.now_s < end - 1e-12:
            q = min(self.quantum_s, end - self.now_s)
            self._quantum(q)

    def _quantum(self, q: float) -> None:
        now_s = self.now_s
        t_end = now_s + q
        for srv, group, snaps in zip(self._servers, self._groups, self._snapshots, strict=True):
            # TP ranks wait for the slowest
            clock = group[0].clock_mhz if len(group) == 1 else min([g.clock_mhz for g in group])
            busy, mem_s, comp_s = srv.run_until(t_end, clock, now_s)
            u_mem = mem_s / busy if busy > 0 else 0.0
            u_comp = comp_s / busy if busy > 0 else 0.0
            for g in group:
                g.account(q, busy, u_mem, u_comp, clock)
            snaps.append(
                (
                    t_end,
                    srv.prompt_tokens_total,
                    srv.generation_tokens_total,
                    srv.finished_total,
                    srv.preemptions_total,
                )
            )
            if len(snaps) > _SNAPSHOT_KEEP:
                del snaps[: len(snaps) - _SNAPSHOT_KEEP // 2]
        self.now_s = t_end

    # ---- GPUs ---------------------------------------------------------------------------------
    def gpu_readings(self) -> list[GpuObservation]:
        return [g.observation() for g in self._gpus]

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no GPU {index}; this host has {len(self._gpus)}")
        self._gpus[index].set_power_limit_w(watts)

    def energy_j_total(self) -> float:
        return sum([g.energy_j for g in self._gpus])

    def power_totals_w(self) -> tuple[float, float, float]:
        """The sums over the GPUs of what `gpu_readings` reports as the 1 s average power, the
        instant power and the limit (the same rounded values), without building readings."""
        avg = 0.0
        instant = 0.0
        limits = 0.0
        for g in self._gpus:
            avg += round(g.power_avg_w, 3)
            instant += round(g.power_instant_w, 3)
            limits += g.power_limit_w
        return avg, instant, limits

    # ---- servers ------------------------------------------------------------------------------
    def _server(self, server: int) -> ServerSim:
        if not 0 <= server < len(self._servers):
            raise IndexError(f"no server {server}; this host has {len(self._servers)}")
        return self._servers[server]

    def batch_state(self, server: int) -> dict[str, int]:
        s = self._server(server)
        return {
            "max_num_seqs": s.max_num_seqs,
            "limit": s.limit,
            "running": s.running,
            "waiting": s.pending_waiting,
        }

    def set_batch_limit(self, server: int, limit: int) -> None:
        s = self._server(server)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise ValueError(f"limit must be an integer, got {limit!r}")
        if not 1 <= limit <= s.max_num_seqs:
            raise ValueError(f"limit {limit} outside [1, {s.max_num_seqs}] (max_num_seqs)")
        s.limit = limit  # gates admission only; running requests are never preempted for it

    def metrics_text(self, server: int) -> str:
        s = self._server(server)
        if not s.metrics_page:
            raise RuntimeError("this host was built without a /metrics page (metrics_page=False)")
        return render_metrics(s, self.model_spec.name, self.epoch_s)

    def scrape(self, server: int, e2e: bool = True) -> dict[tuple[str, str], Any]:
        """What palsd's parser reads from `metrics_text(server)` (EngineSample per engine),
        without the text round trip (and without the e2e histogram when `e2e` is False)."""
        return engine_samples(self._server(server), self.model_spec.name, e2e)

    def tokens_generated_total(self, server: int) -> int:
        return self._server(server).generation_tokens_total

    def request_records(self, server: int, since: int = 0) -> list[RequestRecord]:
        """Finished requests of a server in finishing order, from position `since` on (empty
        when the host was built with keep_records=False, as the long-running shell is)."""
        return self._server(server).records(since)

    def server_signals(self, server: int, window_s: float, e2e: bool = True) -> ServerSignals:
        """Signals over (now - window_s, now], the way palsd derives them from /metrics
        (without e2e latency quantiles when `e2e` is False: the runner's SLO check needs none)."""
        s = self._server(server)
        t1 = self.now_s
        t0 = t1 - window_s
        snaps = self._snapshots[server]
        old = snaps[0]
        for snap in reversed(snaps):
            if snap[0] <= t0 + 1e-9:
                old = snap
                break
        new = snaps[-1]
        span = max(1e-9, new[0] - old[0])
        ttft = s.ttft_samples.window(t0, t1)
        itl = s.itl_samples.window(t0, t1)
        e2e_samples = s.e2e_samples.window(t0, t1) if e2e else []
        return ServerSignals(
            running=float(s.running),
            waiting=float(s.pending_waiting),
            kv_cache_usage=s.kv_usage,
            requests_per_s=(new[3] - old[3]) / span,
            prompt_tokens_per_s=(new[1] - old[1]) / span,
            generation_tokens_per_s=(new[2] - old[2]) / span,
            preemptions_per_s=(new[4] - old[4]) / span,
            ttft_s=_quantiles(ttft),
            itl_s=_quantiles(itl),
            e2e_s=_quantiles(e2e_samples),
            window_s=span,
        )


def _quantiles(samples: list[tuple[float, float]]) -> Quantiles:
    if not samples:
        return Quantiles()
    p50, p90, p99 = weighted_quantiles(samples, (0.5, 0.9, 0.99))
    return Quantiles(p50=p50, p90=p90, p99=p99)
