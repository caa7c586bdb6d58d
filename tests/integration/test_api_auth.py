"""Who may change the budget: reads are open; changes need root/the admin group on the
socket, or the bearer token on loopback TCP. Real daemon, real sockets, a real non-root uid."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.integration.foreign_user import foreign_runtime, unavailable_reason
from tests.integration.procs import PALSCTL, palsd, palsd_config, sim_host


@pytest.fixture
def open_dir():
    # pytest's tmp_path is private to root; a non-root caller needs a path it can traverse.
    path = Path(tempfile.mkdtemp(prefix="palsd-auth-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_non_root_caller_reads_but_cannot_change(tmp_path, open_dir):
    with sim_host(tmp_path, gpus=2, servers=1) as sim, foreign_runtime() as nobody:
        cfg = palsd_config(sim, tmp_path, api={"socket": str(open_dir / "palsd.sock")})
        with palsd(tmp_path, cfg) as d:
            palsctl = nobody.command("palsd.cli.palsctl", "--socket", str(d.socket))
            read = subprocess.run(
                [*palsctl, "status", "--json"], capture_output=True, text=True, env=nobody.env()
            )
            assert read.returncode == 0, read.stderr
            change = subprocess.run(
                [*palsctl, "set-budget", "500W"], capture_output=True, text=True, env=nobody.env()
            )
            assert change.returncode == 1
            assert "403" in change.stderr and "admin group" in change.stderr
            assert d.status()["budget"]["source"] == "none"
            # root may
            assert d.palsctl("set-budget", "900W").returncode == 0
            assert d.status()["budget"]["effective_w"] == 900


def test_tcp_changes_need_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with sim_host(tmp_path, gpus=2, servers=1) as sim:
        cfg = palsd_config(
            sim,
            tmp_path,
            api={
                "tcp": {
                    "enabled": True,
                    "host": "127.0.0.1",
                    "port": 0,
                    "token_file": str(token_file),
                }
            },
        )
        with palsd(tmp_path, cfg) as d:
            port = d.events("api_tcp_listening")[0]["port"]
            url = f"http://127.0.0.1:{port}"
            assert httpx.get(f"{url}/v1/status").status_code == 200
            resp = httpx.put(f"{url}/v1/budget/override", json={"budget_w": 700})
            assert resp.status_code == 401 and resp.json()["reason"] == "unauthorised"
            wrong = httpx.put(
                f"{url}/v1/budget/override",
                json={"budget_w": 700},
                headers={"Authorization": "Bearer nope"},
            )
            assert wrong.status_code == 401
            assert d.status()["budget"]["source"] == "none"
            ok = subprocess.run(
                [*PALSCTL, "--url", url, "--token-file", str(token_file), "set-budget", "700W"],
                capture_output=True,
                text=True,
            )
            assert ok.returncode == 0, ok.stderr
            assert d.status()["budget"]["effective_w"] == 700
