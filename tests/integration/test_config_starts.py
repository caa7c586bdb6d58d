"""A configuration `palsd check-config` accepts starts: one that uses the edges of the schema
(topic levels, a dotted host id, a group, the TCP API with its token file, anchors) passes
check-config, and `palsd run` reaches its first decision with it, replacing the stale socket a
killed run left at api.socket."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import yaml

from tests.integration.procs import PALSD, palsd, palsd_config, sim_host


def test_an_accepted_edge_config_starts_and_replaces_its_own_stale_socket(
    tmp_path: Path,
) -> None:
    token = tmp_path / "api.token"
    token.write_text("t0ken\n")
    with sim_host(tmp_path, gpus=2, servers=1) as sim:
        cfg = palsd_config(
            sim,
            tmp_path,
            control={"dry_run": True},
            api={"tcp": {"enabled": True, "port": 0, "token_file": str(token)}},
            mqtt={
                "enabled": True,
                "url": "mqtt://127.0.0.1:9",  # nothing listens: the feed retries, palsd runs
                "topic_prefix": "site-a/palsd",
                "host_id": "gpu-host-7.rack3",
                "groups": [{"topic": "rack3", "share": 0.5}],
                "reconnect_min_s": 0.5,
                "reconnect_max_s": 2,
            },
        )
        path = tmp_path / "palsd.yaml"
        path.write_text(yaml.safe_dump(cfg))
        check = subprocess.run(
            [*PALSD, "check-config", str(path)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stderr

        stale = Path(cfg["api"]["socket"])
        leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        leftover.bind(str(stale))
        leftover.close()  # a socket file nobody listens on, as a SIGKILLed palsd leaves it

        with palsd(tmp_path, cfg) as d:  # waits for the socket and the first decision
            assert d.status()["budget"]["source"] == "none"
            assert d.events("api_tcp_listening")
            assert d.stop(signal.SIGTERM) == 0
        assert not stale.exists(), "palsd removes its own socket at stop"
