"""Config validation: every problem names its key, its value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from palsd.config import (
    RELOADABLE_KEYS,
    ConfigError,
    changed_keys,
    load_config,
    parse_config,
    with_reloaded,
)


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
            "servers[1].gpus",
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


def _check(tmp_path: Path, text: str | bytes) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "palsd.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "palsd.cli.palsd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _problems(tmp_path: Path, text: str | bytes) -> list[str]:
    path = tmp_path / "palsd.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_check_config_reports_every_problem_of_the_issue_in_one_run(tmp_path: Path) -> None:
    # Each problem palsd check-config once missed, all in one file: one line each, exit 2.
    missing = tmp_path / "no-such-token"
    text = f"""
control:
  dry_run: "yes"
  period_s: true
gpu:
  backend: sim
  sim_url: http://127.0.0.1:8100
budget:
  default_w: 1000
  fallback_w: 2000
api:
  tcp: {{enabled: true, token_file: {missing}, port: 9101}}
metrics: {{port: 9101}}
servers:
  - {{name: a, url: "http://x", gpus: [0], min_batch_limit: 64, max_batch_limit: 8}}
  - {{name: a, url: "http://y", gpus: [0]}}
mqtt:
  enabled: true
  topic_prefix: "#"
  host_id: "x/y"
  max_ttl_s: {"9" * 330}
"""
    proc = _check(tmp_path, text)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    expected = [
        ("control.dry_run", "'yes'"),
        ("control.period_s", "True"),
        ("budget.fallback_w", "must not exceed budget.default_w"),
        ("api.tcp.port", "metrics.port"),
        ("servers[0].min_batch_limit", "max_batch_limit"),
        ("servers[1].name", "repeats"),
        ("servers[1].gpus", "GPU 0 is listed by both"),
        ("mqtt.topic_prefix", "'#'"),
        ("mqtt.host_id", "'x/y'"),
        ("mqtt.max_ttl_s", "digits"),
        ("api.tcp.token_file", "cannot be read"),
    ]
    for key, fragment in expected:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith(key + ":")]
        assert lines and any(fragment in ln for ln in lines), (key, proc.stderr)


def test_duplicate_keys_are_each_reported_with_their_lines(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "control:\n  period_s: 1\n  period_s: 2\ncontrol: {}\n")
    assert any("period_s: duplicate key at line 3 (first at line 2)" in p for p in problems)
    assert any("control: duplicate key at line 4 (first at line 1)" in p for p in problems)


def test_bad_utf8_is_a_problem_with_its_offset_not_a_traceback(tmp_path: Path) -> None:
    proc = _check(tmp_path, b"control:\n  period_s: 0.5 # \xff\xfe\n")
    assert proc.returncode == 2
    assert "not UTF-8: byte 0xff at offset" in proc.stderr and "Traceback" not in proc.stderr


def test_alias_bomb_is_refused_unexpanded(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for n in range(1, 12):
        prev = f"*a{n - 1}"
        lines.append(f"a{n}: &a{n} [{', '.join([prev] * 9)}]")
    problems = _problems(tmp_path, "\n".join(lines) + "\n")
    assert len(problems) == 1 and "refused unexpanded" in problems[0], problems
    # A long chain of two aliases per level stays under the alias count but would still
    # expand to 2**40 values: refused by the expanded size, also without expanding.
    chain = ["b0: &b0 [x, x]"] + [f"b{n}: &b{n} [*b{n - 1}, *b{n - 1}]" for n in range(1, 41)]
    problems = _problems(tmp_path, "\n".join(chain) + "\n")
    assert "refused unexpanded" in problems[0]


def test_small_anchors_are_fine(tmp_path: Path) -> None:
    text = """
gpu: {backend: sim, sim_url: "http://127.0.0.1:1"}
x-slo: &slo {ttft_s: 1.0, itl_s: 0.1}
"""
    # x-slo is an unknown key: anchors are allowed, but the document must still be a config.
    assert any("x-slo: unknown key" in p for p in _problems(tmp_path, text))
    ok = """
gpu: {backend: sim, sim_url: "http://127.0.0.1:1"}
servers:
  - {name: a, url: "http://x", gpus: [0], slo: &slo {ttft_s: 1.0, itl_s: 0.1}}
  - {name: b, url: "http://y", gpus: [1], slo: *slo}
"""
    (tmp_path / "ok.yaml").write_text(ok)
    assert load_config(tmp_path / "ok.yaml").servers[1].slo.ttft_s == 1.0


def test_oversized_and_multi_document_files_are_refused(tmp_path: Path) -> None:
    assert "larger than" in _problems(tmp_path, "#" * 300_000 + "\n")[0]
    assert "not valid YAML" in _problems(tmp_path, "control: {}\n---\ngpu: {}\n")[0]


@pytest.mark.parametrize(
    ("mqtt", "key"),
    [
        ({"topic_prefix": "#"}, "mqtt.topic_prefix"),
        ({"topic_prefix": "a/+/b"}, "mqtt.topic_prefix"),
        ({"topic_prefix": "a//b"}, "mqtt.topic_prefix"),
        ({"host_id": "x/y"}, "mqtt.host_id"),
        ({"host_id": ""}, "mqtt.host_id"),
        ({"groups": [{"topic": "rack/#", "share": 0.5}]}, "mqtt.groups[0].topic"),
        ({"url": "mqtt://"}, "mqtt.url"),
        ({"url": "mqtt://h:99999"}, "mqtt.url"),
    ],
)
def test_mqtt_topics_and_url_follow_the_feeds_rules(mqtt: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": mqtt})
    assert any(p.startswith(key + ":") for p in info.value.problems), info.value.problems


def test_a_config_check_config_accepts_builds_the_mqtt_topics() -> None:
    from palsd.feed.topics import FeedTopics

    cfg = parse_config({"mqtt": {"topic_prefix": "site/palsd", "host_id": "h1"}})
    FeedTopics.build(cfg.mqtt.topic_prefix, cfg.mqtt.host_id or "h", [])


def test_restore_needs_no_secret_files(tmp_path: Path) -> None:
    path = tmp_path / "palsd.yaml"
    path.write_text("api:\n  tcp: {enabled: true, token_file: /nonexistent/token}\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert load_config(path, check_files=False).api.tcp.enabled


def test_a_reload_names_every_changed_key_and_keeps_only_the_reloadable_ones() -> None:
    running = parse_config({"budget": {"default_w": 1200}})
    new = parse_config(
        {
            "budget": {"default_w": 900, "max_override_ttl_s": 600},
            "scrape": {"window_s": 5},
            "logging": {"level": "debug"},
            "control": {"period_s": 1.0, "joint": {"low_margin": 0.3}},
        }
    )
    changed = changed_keys(running, new)
    assert changed == [
        "budget.default_w",
        "budget.max_override_ttl_s",
        "control.joint.low_margin",
        "control.period_s",
        "logging.level",
        "scrape.window_s",
    ]
    in_force = with_reloaded(running, new)
    # the reloadable keys took the new values; the others wait for a restart, so the next
    # reload of the same file names them again
    assert changed_keys(in_force, new) == [k for k in changed if k not in RELOADABLE_KEYS]
    assert in_force.budget.default_w == 900 and in_force.control.period_s == 1.0
    assert in_force.logging == running.logging and in_force.scrape == running.scrape
    assert changed_keys(running, running) == []
