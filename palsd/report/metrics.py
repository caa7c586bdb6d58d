"""palsd's Prometheus metrics: names, units and labels in one place.

Base units (watts, joules, seconds), `_total` for counters. A `Metrics` owns its own registry,
so tests and several daemons in one process never share state.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from palsd.core.slo import slo_met
from palsd.core.types import (
    BatchControl,
    BudgetInForce,
    BudgetSource,
    Decision,
    GpuObservation,
    ServerObservation,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        g = ["gpu"]
        self.info = Info("palsd", "palsd build and mode", registry=r)
        self.dry_run = Gauge("palsd_dry_run", "1 when palsd only logs the limits", registry=r)
        self.gpu_power_w = Gauge(
            "palsd_gpu_power_watts", "GPU power, NVML's averaged reading", g, registry=r
        )
        self.gpu_power_instant_w = Gauge(
            "palsd_gpu_power_instant_watts", "GPU instant power reading", g, registry=r
        )
        self.gpu_energy_j = Gauge(
            "palsd_gpu_energy_joules",
            "GPU energy counter since driver load (monotonic; use rate())",
            g,
            registry=r,
        )
        self.gpu_limit_w = Gauge(
            "palsd_gpu_power_limit_watts", "GPU power limit in force", g, registry=r
        )
        self.gpu_min_limit_w = Gauge(
            "palsd_gpu_power_limit_min_watts", "lowest settable limit", g, registry=r
        )
        self.gpu_max_limit_w = Gauge(
            "palsd_gpu_power_limit_max_watts", "highest settable limit", g, registry=r
        )
        self.limit_sum_w = Gauge(
            "palsd_power_limit_sum_watts", "sum of the controlled GPUs' limits", registry=r
        )
        self.power_sum_w = Gauge(
            "palsd_power_sum_watts", "sum of the controlled GPUs' averaged power", registry=r
        )
        self.budget_w = Gauge("palsd_budget_watts", "host budget in force (NaN: none)", registry=r)
        self.budget_source = Gauge(
            "palsd_budget_source", "1 for the source of the budget in force", ["source"], registry=r
        )
        self.budget_infeasible = Gauge(
            "palsd_budget_infeasible",
            "1 when the budget is below the sum of minimum limits",
            registry=r,
        )
        self.fallback_active = Gauge(
            "palsd_budget_fallback_active", "1 while the fallback budget is in force", registry=r
        )
        self.decisions = Counter(
            "palsd_decisions_total", "control decisions by mode", ["mode"], registry=r
        )
        self.limit_writes = Counter(
            "palsd_power_limit_writes_total",
            "power-limit writes (or would-be writes in dry run)",
            registry=r,
        )
        self.actuation_errors = Counter(
            "palsd_actuation_errors_total", "failed writes", ["target", "reason"], registry=r
        )
        self.sense_errors = Counter(
            "palsd_sense_errors_total", "failed reads", ["source"], registry=r
        )
        self.tick_s = Histogram(
            "palsd_tick_duration_seconds",
            "wall time of one sense-decide-act-report tick",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.enforce_s = Histogram(
            "palsd_budget_enforce_duration_seconds",
            "from a lower budget's arrival to its last limit written",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.tick_overruns = Counter(
            "palsd_tick_overruns_total", "ticks that took longer than the period", registry=r
        )
        self.last_tick_ts = Gauge(
            "palsd_last_tick_timestamp_seconds", "unix time of the last completed tick", registry=r
        )
        s = ["server"]
        self.server_up = Gauge("palsd_server_up", "1 when the last scrape worked", s, registry=r)
        self.server_batch_limit = Gauge(
            "palsd_server_batch_limit",
            "batch limit as the server last reported it (absent while unknown)",
            s,
            registry=r,
        )
        self.server_batch_control = Gauge(
            "palsd_server_batch_control",
            "1 for the state of palsd's control of the server's batch limit "
            "(ok, plugin_missing, engine_plugin_missing, unauthorised, unreachable, unknown)",
            ["server", "state"],
            registry=r,
        )
        self.server_running = Gauge(
            "palsd_server_requests_running", "running requests", s, registry=r
        )
        self.server_waiting = Gauge(
            "palsd_server_requests_waiting", "waiting requests", s, registry=r
        )
        self.server_gen_tps = Gauge(
            "palsd_server_generation_tokens_per_second", "windowed generation rate", s, registry=r
        )
        self.server_slo_met = Gauge(
            "palsd_server_slo_met", "1 when the windowed quantiles meet every SLO", s, registry=r
        )
        self.tokens_per_joule = Gauge(
            "palsd_tokens_per_joule",
            "host generation tokens per joule over the window",
            registry=r,
        )
        self.api_requests = Counter(
            "palsd_api_requests_total", "local API requests", ["method", "status"], registry=r
        )
        self.api_rejected = Counter(
            "palsd_api_rejected_total", "refused API requests", ["reason"], registry=r
        )
        self.state_write_failures = Counter(
            "palsd_state_write_failures_total",
            "failed saves of a state file (disk full, read-only); what it covers is not written",
            ["file"],
            registry=r,
        )
        self.config_reloads = Counter(
            "palsd_config_reloads_total", "SIGHUP reloads", ["result"], registry=r
        )

    # ---- updates: what each step of the daemon reports ----

    def report_budget(self, budget: BudgetInForce) -> None:
        self.budget_w.set(float("nan") if budget.effective_w is None else budget.effective_w)
        for source in BudgetSource:
            self.budget_source.labels(source.value).set(1 if source == budget.source else 0)
        self.fallback_active.set(1 if budget.source == BudgetSource.FALLBACK else 0)

    def report_tick_time(self, elapsed_s: float, period_s: float) -> None:
        self.tick_s.observe(elapsed_s)
        if elapsed_s > period_s:
            self.tick_overruns.inc()

    def report_tick(
        self,
        budget: BudgetInForce,
        decision: Decision,
        gpus: Sequence[GpuObservation],
        servers: Sequence[ServerObservation],
        at_s: float,
    ) -> float:
        """Everything one completed tick shows; answers the host's summed averaged power."""
        self.report_budget(budget)
        self.decisions.labels(decision.mode).inc()
        self.budget_infeasible.set(1 if decision.infeasible else 0)
        for g in gpus:
            label = str(g.index)
            if g.power_w is not None:
                self.gpu_power_w.labels(label).set(g.power_w)
            if g.power_instant_w is not None:
                self.gpu_power_instant_w.labels(label).set(g.power_instant_w)
            if g.energy_j is not None:
                self.gpu_energy_j.labels(label).set(g.energy_j)
            self.gpu_limit_w.labels(label).set(g.power_limit_w)
            self.gpu_min_limit_w.labels(label).set(g.min_limit_w)
            self.gpu_max_limit_w.labels(label).set(g.max_limit_w)
        self.limit_sum_w.set(sum(g.power_limit_w for g in gpus))
        power_w = sum(g.power_w or 0.0 for g in gpus)
        self.power_sum_w.set(power_w)
        tokens_per_s = 0.0
        for s in servers:
            self.server_up.labels(s.name).set(0 if s.signals is None else 1)
            if s.batch_limit is not None:
                self.server_batch_limit.labels(s.name).set(s.batch_limit)
            else:
                # Unknown is shown as absent, never as the last value palsd saw or wanted.
                with suppress(KeyError):
                    self.server_batch_limit.remove(s.name)
            for state in BatchControl:
                self.server_batch_control.labels(s.name, state.value).set(
                    1 if state is s.batch_control else 0
                )
            if s.signals is not None:
                self.server_running.labels(s.name).set(s.signals.running)
                self.server_waiting.labels(s.name).set(s.signals.waiting)
                self.server_gen_tps.labels(s.name).set(s.signals.generation_tokens_per_s)
                tokens_per_s += s.signals.generation_tokens_per_s
            met = slo_met(s.slo, s.signals)
            if met is not None:
                self.server_slo_met.labels(s.name).set(1 if met else 0)
        if power_w > 0:
            self.tokens_per_joule.set(tokens_per_s / power_w)
        self.last_tick_ts.set(at_s)
        return power_w
