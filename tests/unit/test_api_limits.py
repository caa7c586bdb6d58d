"""The local API under abuse, in-process over a real Unix socket: strict bodies, a body cap,
a per-peer connection cap, a whole-exchange deadline, changes whose client left, and a flood
of idle connections that leaves palsctl working and the log small."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import pytest

from palsd.api.server import ApiLimits, ApiServer
from tests.unit.api_port import MemoryPort

PUT = "PUT /v1/budget/override HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def _request(body: bytes, extra: str = "") -> bytes:
    return (PUT + extra + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(path: Path, raw: bytes) -> tuple[int, dict[str, object] | str]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


async def _started(tmp_path: Path, limits: ApiLimits | None = None) -> tuple[ApiServer, MemoryPort]:
    port = MemoryPort(tmp_path / "state")
    api = ApiServer(port, tmp_path / "api.sock", None, limits=limits)
    await api.start()
    return api, port


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"budget_w": ' + b"9" * 330 + b"}", "bad_value"),
        (b'{"budget_w": 500, "ttl_s": ' + b"9" * 330 + b"}", "bad_value"),
        (b'{"budget_w": ' + b"9" * 4000 + b"}", "bad_value"),
        (b'{"budget_w": "500"}', "bad_value"),
        (b'{"budget_w": true}', "bad_value"),
        (b'{"budget_w": NaN}', "bad_value"),
        (b'{"budget_w": 1e999}', "bad_value"),
        (b'{"budget_w": 500, "extra": 1}', "bad_value"),
        (b'{"budget_w": 500, "reason": "' + b"x" * 201 + b'"}', "bad_value"),
        (b"[500]", "bad_value"),
        (b"\xff\xfe", "bad_json"),
        (b"", "bad_json"),
    ],
)
async def test_bad_bodies_are_counted_400s_and_change_nothing(
    tmp_path: Path, body: bytes, reason: str
) -> None:
    api, port = await _started(tmp_path)
    try:
        status, answer = await _exchange(api.socket_path, _request(body))
    finally:
        await api.stop()
    assert status == 400, answer
    assert isinstance(answer, dict) and answer["reason"] == reason
    assert port.rejected(reason) == 1
    assert port.changes == 0
    assert not any(level == "exception" for level, _, _ in port.log.lines)


async def test_a_body_over_the_cap_is_a_counted_413(tmp_path: Path) -> None:
    api, port = await _started(tmp_path, ApiLimits(max_body_bytes=256))
    try:
        body = b'{"budget_w": 500, "reason": "' + b"x" * 300 + b'"}'
        status, answer = await _exchange(api.socket_path, _request(body))
    finally:
        await api.stop()
    assert status == 413 and isinstance(answer, dict) and answer["reason"] == "too_large"
    assert port.rejected("too_large") == 1 and port.changes == 0


async def test_malformed_http_is_one_counted_line_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api, port = await _started(tmp_path)
    try:
        status, _ = await _exchange(api.socket_path, b"GARBAGE\x00 / HTTP/9\r\n\r\n")
        long_header = _request(b"{}", extra="X-Pad: " + "a" * 10_000 + "\r\n")
        status2, _ = await _exchange(api.socket_path, long_header)
    finally:
        await api.stop()
    assert status == 400 and status2 == 400
    assert port.rejected("bad_http") == 2
    assert not [r for r in caplog.records if r.exc_info], "a client's fault logged a traceback"


async def test_a_change_whose_client_left_is_not_applied(tmp_path: Path) -> None:
    api, port = await _started(tmp_path)
    try:
        # The whole request is sent and the client closes before palsd gets to it (the event
        # loop does not run between these lines): by the time it is read nobody waits for it.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(api.socket_path))
        client.sendall(_request(b'{"budget_w": 900}'))
        client.close()
        deadline = time.monotonic() + 60
        while not port.rejected("client_gone") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await api.stop()
    assert port.rejected("client_gone") == 1
    assert port.changes == 0
    assert port.book.override is None


async def test_an_idle_connection_is_dropped_at_the_deadline_and_counted(tmp_path: Path) -> None:
    api, port = await _started(tmp_path, ApiLimits(request_timeout_s=0.3))
    try:
        reader, writer = await asyncio.open_unix_connection(str(api.socket_path))
        writer.write(PUT.encode())  # headers never finished
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=30) == b""  # palsd hung up
        writer.close()
    finally:
        await api.stop()
    assert port.rejected("timeout") == 1 and port.changes == 0


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_a_flood_of_idle_connections_is_capped_and_palsctl_still_works(
    tmp_path: Path,
) -> None:
    flood_n = 1100
    _raise_nofile(flood_n + 512)
    # No deadline drops within the test: admitted flood connections stay for its whole length.
    limits = ApiLimits(max_connections_per_peer=32, max_connections=256, request_timeout_s=600)
    api, port = await _started(tmp_path, limits)
    flood: list[socket.socket] = []
    try:
        for _ in range(flood_n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(api.socket_path))
            except BlockingIOError:
                pass  # queued in the backlog: palsd accepts it below
            flood.append(s)
            if len(flood) % 64 == 0:
                await asyncio.sleep(0)  # let palsd accept (and refuse) as a real server would
        expected = flood_n - limits.max_connections_per_peer
        deadline = time.monotonic() + 120
        while (
            port.rejected("too_many_connections_from_peer") < expected
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        assert port.rejected("too_many_connections_from_peer") == expected
        # palsctl, another process, root too: its own slot, answered at once.
        for argv in (["status", "--json"], ["set-budget", "800W"]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "palsd.cli.palsctl",
                "--socket",
                str(api.socket_path),
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            assert proc.returncode == 0, err.decode()
        assert port.book.override is not None and port.book.override.watts == 800
    finally:
        for s in flood:
            s.close()
        await api.stop()
    # One line per refusal reason per 10 s, with the count of those suppressed, not 1,068.
    refusals = [ln for ln in port.log.lines if ln[1] == "api_connection_refused"]
    assert 1 <= len(refusals) <= 3, refusals[:5]


async def test_out_of_descriptors_is_one_counted_line_and_no_busy_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api, port = await _started(tmp_path)
    # The client exists (with its pipes) before this process runs out of descriptors.
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import socket, sys; sys.stdin.readline(); s = socket.socket(socket.AF_UNIX);"
        f"s.connect({str(api.socket_path)!r}); s.sendall(b'GET /v1/health HTTP/1.1\\r\\n"
        "Host: x\\r\\n\\r\\n'); print(s.recv(100).split()[1].decode())",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hogs: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        try:
            while True:
                hogs.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass  # every descriptor taken: palsd's accept() now fails with EMFILE
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        deadline = time.monotonic() + 60  # asyncio retries accept once a second: no busy loop
        while port.rejected("out_of_descriptors") < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for fd in hogs:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        out, _ = await asyncio.wait_for(client.communicate(), timeout=60)
    finally:
        await api.stop()
    assert out.decode().strip() == "200", "the connection waited in the backlog and was served"
    assert port.rejected("out_of_descriptors") >= 3
    lines = [ln for ln in port.log.lines if ln[1] == "api_accept_failed"]
    assert len(lines) == 1, lines  # one line per 10 s, the rest counted
    assert not [r for r in caplog.records if r.exc_info], "asyncio logged a traceback"


def test_connection_caps_shrink_to_fit_the_descriptor_limit() -> None:
    from palsd.api.server import _fit_to_descriptors

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if len(os.listdir("/proc/self/fd")) > 200:
        pytest.skip("this process already holds more than 200 descriptors")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
        fitted = _fit_to_descriptors(ApiLimits(max_connections=256, max_connections_per_peer=32))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert fitted.max_connections == (300 - 128) // 2
    assert fitted.max_connections_per_peer == 32
