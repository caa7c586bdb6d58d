"""palsd's Prometheus metrics: names, units and labels in one place.

Base units (watts, joules, seconds), `_total` for counters. A `Metrics` owns its own registry,
so tests and several daemons in one process never share state.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


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
            "palsd_server_batch_limit", "live batch limit", s, registry=r
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
