"""Fuzzing the config loader: whatever the file holds (config-shaped YAML with wrong values,
unknown keys, wildcards in topics, anchors, duplicate keys, mangled text, raw bytes), load_config
returns a configuration or raises ConfigError listing problems as `key: ...` lines; nothing else
escapes. A configuration it accepts passes what `palsd run` does with it at start. 2,000 cases in
`make test` (tests/fuzz_profiles.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from hypothesis import given
from hypothesis import strategies as st

from palsd.config import ConfigError, PalsdConfig, load_config
from palsd.feed.topics import FeedTopics
from tests.fuzz_profiles import FUZZ

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.integers(min_value=-2, max_value=70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["yes", "#", "+", "a/b", "x//y", "/", "", "http://h:1", "mqtt://h", "sim"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
server = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["a", "b", "a b", ""]) | values,
        "url": st.sampled_from(["http://127.0.0.1:8000", "http://", "ftp://x", "http://h:0"])
        | values,
        "gpus": st.lists(st.integers(-1, 3), max_size=3) | values,
        "min_batch_limit": st.integers(-1, 300) | values,
        "max_batch_limit": st.integers(-1, 300) | values,
        "slo": st.fixed_dictionaries({}, optional={"ttft_s": scalars, "itl_quantile": scalars}),
    },
)
config = st.fixed_dictionaries(
    {},
    optional={
        "control": st.fixed_dictionaries(
            {},
            optional={
                "period_s": scalars,
                "dry_run": scalars,
                "controller": st.sampled_from(["joint", "demand_split", "x"]),
            },
        ),
        "gpu": st.fixed_dictionaries(
            {},
            optional={
                "backend": st.sampled_from(["sim", "nvml", "tpu"]),
                "sim_url": st.sampled_from(["http://127.0.0.1:1", "nope", "http://"]) | scalars,
                "indices": st.lists(st.integers(-1, 3), max_size=4) | scalars,
            },
        ),
        "budget": st.fixed_dictionaries({}, optional={"default_w": scalars, "fallback_w": scalars}),
        "servers": st.lists(server, max_size=3) | values,
        "api": st.fixed_dictionaries(
            {},
            optional={
                "tcp": st.fixed_dictionaries(
                    {}, optional={"enabled": scalars, "port": scalars, "token_file": scalars}
                )
            },
        ),
        "metrics": st.fixed_dictionaries(
            {},
            optional={
                "host": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "example.org"]) | scalars,
                "port": scalars,
            },
        ),
        "mqtt": st.fixed_dictionaries(
            {},
            optional={
                "enabled": scalars,
                "url": st.sampled_from(["mqtt://127.0.0.1:1883", "mqtts://b", "mqtt://"]) | scalars,
                "topic_prefix": scalars,
                "host_id": scalars,
                "groups": st.lists(
                    st.fixed_dictionaries({"topic": scalars, "share": scalars}), max_size=2
                )
                | values,
                "reconnect_min_s": scalars,
                "reconnect_max_s": scalars,
            },
        ),
        "unknown": values,
    },
)


@st.composite
def files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["config", "config", "mangled", "anchors", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    text = yaml.safe_dump(draw(config), allow_unicode=True)
    if kind == "mangled":
        cut = draw(st.integers(min_value=0, max_value=len(text)))
        text = (
            text[:cut]
            + draw(st.sampled_from(["\n", ":", "- ", "&a ", "*a", "{", "\t", "x: 1\n"]))
            + text[cut:]
        )
    elif kind == "anchors":
        depth = draw(st.integers(1, 30))
        fan = draw(st.integers(1, 9))
        lines = ["a0: &a0 [x, x]"]
        lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * fan)}]" for n in range(1, depth)]
        text = "\n".join(lines) + "\n" + text
    return text.encode("utf-8", errors="surrogatepass")


def _starts(cfg: PalsdConfig) -> None:
    """What `palsd run` derives from the configuration before it serves, minus the I/O."""
    for server in cfg.servers:
        assert urlsplit(server.url).hostname and urlsplit(server.url).port != 0
    if cfg.gpu.backend == "sim":
        assert cfg.gpu.sim_url and urlsplit(cfg.gpu.sim_url).hostname
    if cfg.metrics.host != "localhost":
        ipaddress.ip_address(cfg.metrics.host)
    m = cfg.mqtt
    urlsplit(m.url).port  # noqa: B018  (raises on a bad port)
    FeedTopics.build(m.topic_prefix, m.host_id or "host", [(g.topic, g.share) for g in m.groups])
    owners = [g for s in cfg.servers for g in s.gpus]
    assert len(owners) == len(set(owners))
    for server in cfg.servers:
        assert server.max_batch_limit is None or server.min_batch_limit <= server.max_batch_limit


def test_any_file_gives_a_config_or_every_problem_as_key_lines(tmp_path: Path) -> None:
    path = tmp_path / "palsd.yaml"
    outcomes = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(raw=files())
    def check(raw: bytes) -> None:
        path.write_bytes(raw)
        try:
            cfg = load_config(path)
        except ConfigError as err:
            outcomes["refused"] += 1
            assert err.problems
            for line in err.problems:
                key, sep, rest = line.partition(": ")
                assert sep and key and rest, line
                assert "Traceback" not in line and len(line) < 2000, line
            return
        outcomes["accepted"] += 1
        _starts(cfg)

    check()
    assert outcomes["accepted"] and outcomes["refused"], outcomes
