"""deploy/: every manifest parses, names real metrics and files, grants only CAP_SYS_ADMIN."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from palsd.config import parse_config
from palsd.feed.mqtt import _FeedMetrics
from palsd.report.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DAEMONSET = DEPLOY / "kubernetes" / "palsd-daemonset.yaml"
COMPOSE = DEPLOY / "compose" / "docker-compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "palsd-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "palsd-alerts.yaml"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_series_names() -> set[str]:
    registry = Metrics().registry
    _FeedMetrics(registry)  # the MQTT feed registers its own metrics beside the daemon's
    names: set[str] = set()
    for family in registry.collect():
        suffixes = _SUFFIXES.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bpalsd_[a-z0-9_]+", expr))


def yaml_documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _daemonset_docs() -> dict[str, Any]:
    return {d["kind"]: d for d in yaml_documents(DAEMONSET)}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_deploy_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        assert json.loads(path.read_text())
    else:
        assert yaml_documents(path)


def test_daemonset_grants_only_sys_admin_and_never_privileged() -> None:
    pod = _daemonset_docs()["DaemonSet"]["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    assert len(containers) >= 2
    for c in containers:
        sc = c["securityContext"]
        assert sc.get("privileged", False) is False, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["add"] == ["SYS_ADMIN"], c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env == {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}
        # A GPU resource request would take the GPUs away from the vLLM pods.
        assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False), key
    assert pod["automountServiceAccountToken"] is False


def test_daemonset_restores_from_a_host_state_dir_before_the_daemon_starts() -> None:
    docs = _daemonset_docs()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    config = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["palsd.yaml"]))
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"]["path"] == str(config.state.dir)
    init = pod["initContainers"][0]
    assert init["command"][:2] == ["palsd", "restore"]
    for c in [init, *pod["containers"]]:
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["state"] == str(config.state.dir), c["name"]
        assert mounts["run"] == str(config.api.socket.parent), c["name"]


def test_compose_has_the_stack_and_every_referenced_file_exists() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"vllm", "palsd", "mosquitto", "prometheus", "grafana"} <= set(services)
    named_volumes = set(compose.get("volumes", {}))
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in named_volumes, f"{name}: {source}"
    palsd = services["palsd"]
    assert palsd["cap_add"] == ["SYS_ADMIN"] and palsd["cap_drop"] == ["ALL"]
    assert "privileged" not in palsd
    assert services["palsd-restore"]["command"][:2] == ["palsd", "restore"]
    assert palsd["depends_on"]["palsd-restore"]["condition"] == "service_completed_successfully"


def test_compose_palsd_config_is_valid_and_points_at_compose_services() -> None:
    config = parse_config(yaml.safe_load((COMPOSE.parent / "palsd.yaml").read_text()))
    services = set(yaml.safe_load(COMPOSE.read_text())["services"])
    assert config.mqtt.url.split("//")[1].split(":")[0] in services
    for server in config.servers:
        assert server.url.split("//")[1].split(":")[0] in services
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    palsd_job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "palsd")
    assert palsd_job["static_configs"][0]["targets"] == [f"palsd:{config.metrics.port}"]


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"${var['name']}", var["definition"]))
    return out


def test_dashboard_queries_name_only_metrics_palsd_exports() -> None:
    known = exported_series_names()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: {expr}"
        assert names <= known, f"{title}: unknown {names - known}"


def test_dashboard_covers_power_limits_batch_slo_efficiency_and_feed() -> None:
    used = {n for _, e in _dashboard_exprs() for n in promql_metric_names(e)}
    for needed in (
        "palsd_power_sum_watts",
        "palsd_budget_watts",
        "palsd_gpu_power_limit_watts",
        "palsd_server_batch_limit",
        "palsd_server_slo_met",
        "palsd_tokens_per_joule",
        "palsd_mqtt_connected",
        "palsd_budget_fallback_active",
        "palsd_mqtt_rejected_total",
    ):
        assert needed in used, needed
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    dashboards = yaml.safe_load((prov / "dashboards" / "palsd.yaml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    targets = [v.split(":")[1] for v in grafana["volumes"]]
    assert f"{path}/{DASHBOARD.name}" in targets


def test_alert_rules_name_only_exported_metrics_and_documented_runbooks() -> None:
    known = exported_series_names()
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    runbook = (ROOT / "docs" / "operations.md").read_text().lower()
    for rule in rules:
        names = promql_metric_names(rule["expr"])
        assert names <= known, f"{rule['alert']}: unknown {names - known}"
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert f"### {anchor}" in runbook, f"{rule['alert']}: no heading for #{anchor}"
    alerts = {r["alert"] for r in rules}
    for needed in (
        "PalsdLimitsAboveBudget",
        "PalsdPowerAboveBudget",
        "PalsdFeedStale",
        "PalsdMqttDisconnected",
        "PalsdFallbackBudget",
        "PalsdBudgetInfeasible",
        "PalsdSloBurnFast",
        "PalsdActuationErrors",
        "PalsdTickStalled",
        "PalsdDown",
        "PalsdServerScrapeDown",
    ):
        assert needed in alerts, needed
