"""deploy/ checked by real validators: promtool, kubernetes-validate, the compose-spec schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
VENV_BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if found is None:
        pytest.skip(f"{name} is not installed (make system-deps / make venv)")
    return found


def test_promtool_accepts_the_alert_rules() -> None:
    out = _run([_tool("promtool"), "check", "rules", str(PROM / "palsd-alerts.yaml")])
    assert "SUCCESS" in out


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    # Fires PalsdLimitsAboveBudget, PalsdTickStalled, PalsdFallbackBudget, PalsdActuationErrors
    # PalsdSloBurnFast and PalsdFeedStale on crafted series; NaN (no budget) fires nothing.
    out = _run([_tool("promtool"), "test", "rules", "palsd-alerts.test.yaml"], cwd=PROM)
    assert "SUCCESS" in out


def test_promtool_accepts_the_scrape_config() -> None:
    out = _run([_tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROM)
    assert "valid prometheus config" in out


def test_kubernetes_validate_accepts_the_daemonset_strictly() -> None:
    manifest = ROOT / "deploy" / "kubernetes" / "palsd-daemonset.yaml"
    out = _run([_tool("kubernetes-validate"), "--strict", str(manifest)])
    assert "daemonset/palsd" in out


def test_compose_file_matches_the_compose_spec_schema() -> None:
    compose = ROOT / "deploy" / "compose" / "docker-compose.yaml"
    _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)])
