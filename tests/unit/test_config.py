"""Config validation: every problem names its key, its value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from palsd.config import ConfigError, load_config, parse_config


def test_defaults_are_valid():
    cfg = parse_config({})
    assert cfg.control.period_s == 0.5
    assert cfg.gpu.backend == "nvml"


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"control": {"period_s": -1}}, "control.period_s", "-1"),
        ({"control": {"peroid_s": 1}}, "control.peroid_s", "unknown key"),
        ({"gpu": {"backend": "sim"}}, "gpu", "sim_url is required"),
        ({"gpu": {"backend": "amd"}}, "gpu.backend", "'nvml' or 'sim'"),
        ({"servers": [{"name": "a", "url": "ftp://x", "gpus": [0]}]}, "servers[0].url", "http"),
        (
            {
                "servers": [
                    {"name": "a", "url": "http://x", "gpus": [0]},
                    {"name": "b", "url": "http://y", "gpus": [0]},
                ]
            },
            "(top level)",
            "GPU 0 is listed by both",
        ),
        ({"budget": {"default_w": "lots"}}, "budget.default_w", "'lots'"),
        (
            {
                "servers": [
                    {"name": "a", "url": "http://x", "gpus": [0], "slo": {"itl_quantile": 0.95}}
                ]
            },
            "servers[0].slo.itl_quantile",
            "0.99",
        ),
        ({"mqtt": {"require_signature": True}}, "mqtt", "hmac_key_file"),
    ],
)
def test_problem_names_key_and_value(data, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    text = "\n".join(info.value.problems)
    assert key in text
    assert fragment in text


def test_yaml_syntax_error_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("control: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in info.value.problems[0]


def test_check_config_cli_exits_2_and_names_every_key(tmp_path):
    path = tmp_path / "palsd.yaml"
    path.write_text("control:\n  period_s: 0\ngpu:\n  backend: tpu\n")
    proc = subprocess.run(
        [sys.executable, "-m", "palsd.cli.palsd", "check-config", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "control.period_s" in proc.stderr and "gpu.backend" in proc.stderr
    assert "'tpu'" in proc.stderr


def test_check_config_cli_accepts_example(tmp_path):
    path = tmp_path / "palsd.yaml"
    path.write_text("gpu:\n  backend: sim\n  sim_url: http://127.0.0.1:1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "palsd.cli.palsd", "check-config", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
