"""The coordinator's deployment files: its config in the Kubernetes ConfigMap is valid, the
Deployment passes kubernetes-validate strictly, and the systemd unit passes systemd-analyze."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palsd.fleet.config import parse_coordinator_config

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "palsd-coordinator.yaml"
UNIT = ROOT / "systemd" / "palsd-coordinator.service"


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def test_the_configmap_holds_a_valid_coordinator_config() -> None:
    cfg = parse_coordinator_config(
        yaml.safe_load(_docs()["ConfigMap"]["data"]["coordinator.yaml"]), "configmap"
    )
    assert cfg.metrics.port == 9103
    pod = _docs()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["palsd", "coordinator"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert _docs()["Deployment"]["spec"]["strategy"]["type"] == "Recreate"


def test_kubernetes_validate_accepts_the_deployment_strictly() -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    if not tool.exists():
        pytest.skip("kubernetes-validate not installed")
    out = subprocess.run(
        [str(tool), "--strict", str(MANIFEST)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    text = UNIT.read_text().replace("/opt/palsd/bin/palsd", "/bin/true")
    unit = tmp_path / "palsd-coordinator.service"
    unit.write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [ln for ln in out.stderr.splitlines() if "palsd-coordinator.service" in ln]
    assert out.returncode == 0 and not problems, out.stderr
