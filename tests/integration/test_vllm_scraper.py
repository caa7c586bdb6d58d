"""VllmScraper and BatchLimitClient over real HTTP, against small aiohttp servers that play the
failure cases a real vLLM rarely shows on demand: errors, timeouts, wrong pages, retries."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from palsd.act.batch import (
    BatchLimitClient,
    BatchLimitRejected,
    BatchLimitState,
    BatchLimitUnauthorized,
    BatchLimitUnavailable,
)
from palsd.sense.vllm import VllmScraper
from palsd.vllm_plugin.contract import PATH, ContractError, check_token, parse_limit
from tests.unit.test_vllm_metrics import v1_page

Handler = Callable[[web.Request], Any]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
STATE_BODY = b'{"max_num_seqs": 8, "limit": 4, "running": 1, "waiting": 0}'


async def serve(routes: list[tuple[str, str, Handler]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def raw_server(handle: RawHandler) -> AsyncIterator[str]:
    """A bare asyncio server calling `handle` for each connection (for what aiohttp will not
    do, like dropping a request unanswered); yields its URL."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        with contextlib.suppress(Exception):  # a handler still asleep: do not wait for it
            await asyncio.wait_for(server.wait_closed(), 2)


class DropsSecondRequest:
    """What uvicorn does to a connection idle for its keep-alive timeout, made deterministic:
    each connection answers its first request (200 with `body`, kept alive) and closes on the
    second without a word. Counts connections, and keeps each answered request's method and
    body."""

    def __init__(self, body: bytes, content_type: str | None = None) -> None:
        self.body = body
        self.content_type = content_type
        self.connections = 0
        self.answered: list[tuple[str, bytes]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        self.answered.append((head.split(b" ", 1)[0].decode(), await reader.readexactly(length)))
        ctype = f"Content-Type: {self.content_type}\r\n" if self.content_type else ""
        writer.write(
            f"HTTP/1.1 200 OK\r\n{ctype}Content-Length: {len(self.body)}\r\n\r\n".encode()
            + self.body
        )
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")  # the next request: dropped unanswered
        writer.close()


async def test_scraper_turns_two_pages_into_rates() -> None:
    pages = [v1_page(gen=1000.0), v1_page(gen=1500.0)]

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=pages.pop(0) if len(pages) > 1 else pages[0])

    runner, url = await serve([("GET", "/metrics", metrics)])
    try:
        scraper = VllmScraper(url, window_s=10.0, timeout_s=2.0)
        first = await scraper.poll(100.0)
        second = await scraper.poll(102.0)
    finally:
        await runner.cleanup()
    assert first is not None and first.generation_tokens_per_s == 0.0
    assert second is not None and second.generation_tokens_per_s == 250.0
    assert (scraper.failures, scraper.stale_reason) == (0, None)
    assert scraper.last_report is not None and len(scraper.last_report.engines) == 1


async def test_scraper_marks_stale_and_recovers() -> None:
    answers = [web.Response(status=500, text="boom"), web.Response(text=v1_page())]

    async def metrics(_: web.Request) -> web.Response:
        return answers.pop(0)

    runner, url = await serve([("GET", "/metrics", metrics)])
    try:
        scraper = VllmScraper(url + "/metrics", timeout_s=2.0)
        assert await scraper.poll(0.0) is None
        assert scraper.stale_reason is not None and "HTTP 500" in scraper.stale_reason
        assert (scraper.failures, scraper.consecutive_failures) == (1, 1)
        assert await scraper.poll(1.0) is not None
    finally:
        await runner.cleanup()
    assert (scraper.failures, scraper.consecutive_failures, scraper.stale_reason) == (1, 0, None)


async def test_scraper_rejects_a_page_that_is_not_vllm() -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="# TYPE up gauge\nup 1\n")

    runner, url = await serve([("GET", "/metrics", metrics)])
    try:
        scraper = VllmScraper(url)
        assert await scraper.poll(0.0) is None
    finally:
        await runner.cleanup()
    assert scraper.stale_reason is not None and "no vllm" in scraper.stale_reason


async def test_scraper_times_out_instead_of_hanging() -> None:
    release = asyncio.Event()

    async def metrics(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text=v1_page())

    runner, url = await serve([("GET", "/metrics", metrics)])
    try:
        scraper = VllmScraper(url, timeout_s=0.2)
        assert await scraper.poll(0.0) is None
    finally:
        release.set()
        await runner.cleanup()
    assert scraper.stale_reason is not None and "timeout" in scraper.stale_reason


async def test_scraper_of_an_unreachable_server_is_stale() -> None:
    scraper = VllmScraper(f"http://127.0.0.1:{_closed_port()}", timeout_s=1.0)
    assert await scraper.poll(0.0) is None
    assert await scraper.poll(1.0) is None
    assert scraper.stale_reason is not None and "cannot reach" in scraper.stale_reason
    assert scraper.failures == 2


async def test_scraper_resends_once_when_the_server_dropped_a_kept_alive_connection() -> None:
    """A connection the server closes on its second request (as uvicorn does to an idle one):
    the scrape is repeated on a fresh connection instead of going stale."""
    peer = DropsSecondRequest(v1_page().encode())
    async with raw_server(peer) as url:
        scraper = VllmScraper(url, timeout_s=5.0)
        assert await scraper.poll(0.0) is not None
        second = await scraper.poll(1.0)
    assert second is not None, scraper.stale_reason
    assert (scraper.failures, scraper.reconnects, peer.connections) == (0, 1, 2)


class ContractServer:
    """The batch-limit contract served with the plugin's own validation code."""

    def __init__(self, token: str | None, max_num_seqs: int = 8, fail_first: int = 0) -> None:
        self.token = token
        self.state = {"max_num_seqs": max_num_seqs, "limit": max_num_seqs, "running": 3}
        self.fail_first = fail_first
        self.calls = 0

    def _answer(self) -> web.Response:
        return web.json_response({**self.state, "waiting": 1})

    def _gate(self, request: web.Request) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ContractError(503, "engine busy")
        check_token(self.token, request.headers.get("Authorization"))

    async def get(self, request: web.Request) -> web.Response:
        try:
            self._gate(request)
        except ContractError as e:
            return web.json_response({"error": e.reason}, status=e.status)
        return self._answer()

    async def put(self, request: web.Request) -> web.Response:
        try:
            self._gate(request)
            self.state["limit"] = parse_limit(await request.json(), self.state["max_num_seqs"])
        except ContractError as e:
            return web.json_response({"error": e.reason}, status=e.status)
        return self._answer()

    async def start(self) -> tuple[web.AppRunner, str]:
        return await serve([("GET", PATH, self.get), ("PUT", PATH, self.put)])


async def test_batch_client_sets_and_reads_the_limit() -> None:
    peer = ContractServer(token="t0k")
    runner, url = await peer.start()
    try:
        batch = BatchLimitClient(url, token="t0k", timeout_s=2.0)
        before = await batch.get()
        after = await batch.set(2)
    finally:
        await runner.cleanup()
    assert before == BatchLimitState(max_num_seqs=8, limit=8, running=3, waiting=1)
    assert after.limit == 2 and peer.state["limit"] == 2


async def test_batch_client_names_a_rejected_value() -> None:
    peer = ContractServer(token=None)
    runner, url = await peer.start()
    try:
        batch = BatchLimitClient(url, timeout_s=2.0)
        with pytest.raises(BatchLimitRejected, match="between 1 and max_num_seqs=8"):
            await batch.set(9)
    finally:
        await runner.cleanup()
    assert peer.state["limit"] == 8 and peer.calls == 1  # a 4xx is not retried


async def test_batch_client_reports_a_token_mismatch() -> None:
    peer = ContractServer(token="right")
    runner, url = await peer.start()
    try:
        batch = BatchLimitClient(url, token="wrong", timeout_s=2.0)
        with pytest.raises(BatchLimitUnauthorized, match="token"):
            await batch.set(4)
        with pytest.raises(BatchLimitUnauthorized):  # a read says so too: nothing swallowed
            await batch.get()
    finally:
        await runner.cleanup()


async def test_batch_client_retries_5xx_with_backoff() -> None:
    peer = ContractServer(token=None, fail_first=2)
    runner, url = await peer.start()
    try:
        batch = BatchLimitClient(url, timeout_s=2.0, attempts=3, backoff_s=0.01)
        state = await batch.set(5)
    finally:
        await runner.cleanup()
    assert state.limit == 5 and peer.calls == 3


async def test_batch_client_gives_up_after_its_attempts() -> None:
    peer = ContractServer(token=None, fail_first=100)
    runner, url = await peer.start()
    try:
        batch = BatchLimitClient(url, timeout_s=2.0, attempts=3, backoff_s=0.01)
        with pytest.raises(BatchLimitUnavailable, match="HTTP 503: engine busy"):
            await batch.set(5)
    finally:
        await runner.cleanup()
    assert peer.calls == 3


async def test_batch_client_explains_a_missing_plugin() -> None:
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    runner, url = await serve([("GET", "/health", health)])
    try:
        batch = BatchLimitClient(url, timeout_s=2.0)
        with pytest.raises(BatchLimitUnavailable, match="VLLM_PLUGINS"):
            await batch.set(4)
    finally:
        await runner.cleanup()


async def test_batch_client_of_an_unreachable_server_fails_fast() -> None:
    batch = BatchLimitClient(
        f"http://127.0.0.1:{_closed_port()}", timeout_s=0.5, attempts=2, backoff_s=0.01
    )
    t0 = time.monotonic()
    with pytest.raises(BatchLimitUnavailable, match="unreachable"):
        await batch.set(4)
    with pytest.raises(BatchLimitUnavailable, match="unreachable"):
        await batch.get()
    # Bounded by attempts x timeout + backoff, not by the server.
    assert time.monotonic() - t0 < 3 * 0.5 + 1.0


async def test_batch_client_does_not_retry_a_501() -> None:
    calls = 0

    async def not_implemented(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"error": "the engine-side plugin is not loaded"}, status=501)

    runner, url = await serve([("PUT", PATH, not_implemented)])
    try:
        batch = BatchLimitClient(url, timeout_s=2.0, attempts=3, backoff_s=0.01)
        with pytest.raises(BatchLimitUnavailable, match="engine-side plugin"):
            await batch.set(4)
    finally:
        await runner.cleanup()
    assert calls == 1


async def test_batch_client_reads_again_when_the_server_dropped_a_kept_alive_connection() -> None:
    """The batch task's GET meets the same idle-connection close as the scraper: the read is
    sent once more on a fresh connection, so a server that is up never shows `unreachable`."""
    peer = DropsSecondRequest(STATE_BODY, "application/json")
    async with raw_server(peer) as url:
        batch = BatchLimitClient(url, timeout_s=5.0)
        first = await batch.get()
        second = await batch.get()
    assert first.limit == second.limit == 4
    assert peer.connections == 2


async def test_batch_client_keeps_one_connection_and_sends_its_token() -> None:
    """Reads and writes go over one kept-alive connection, each with the bearer token and a
    JSON body the plugin's own parser takes (ContractServer checks both)."""
    peer = ContractServer(token="t0k")
    runner, url = await peer.start()
    batch = BatchLimitClient(url, token="t0k", timeout_s=2.0)
    try:
        for limit in (3, 5):
            assert (await batch.set(limit)).limit == limit
            assert (await batch.get()).limit == limit
        connections = len(runner.server.connections) if runner.server else 0
    finally:
        batch.close()
        await runner.cleanup()
    assert connections == 1 and peer.calls == 4


async def test_batch_client_does_not_resend_a_put_on_a_dropped_connection() -> None:
    """A PUT that met a kept-alive connection closed unanswered is not repeated at once (only
    a GET is): that attempt fails (with one attempt, the call), and the next one goes out on a
    fresh connection."""
    peer = DropsSecondRequest(STATE_BODY, "application/json")
    async with raw_server(peer) as url:
        batch = BatchLimitClient(url, timeout_s=5.0, attempts=1)
        try:
            await batch.get()
            with pytest.raises(BatchLimitUnavailable, match="unreachable"):
                await batch.set(4)
            assert peer.connections == 1 and [m for m, _ in peer.answered] == ["GET"]
            state = await batch.set(4)
        finally:
            batch.close()
    assert state.limit == 4 and peer.connections == 2
    assert peer.answered == [("GET", b""), ("PUT", b'{"limit":4}')]


async def test_batch_client_times_out_and_names_an_empty_refusal() -> None:
    """A server that never answers costs one timeout per attempt; a 4xx without a body is
    named by its status line's phrase."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async def conflict(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    for handle in (silent, conflict):
        async with raw_server(handle) as url:
            batch = BatchLimitClient(url, timeout_s=0.2, attempts=2, backoff_s=0.01)
            t0 = time.monotonic()
            try:
                if handle is silent:
                    with pytest.raises(BatchLimitUnavailable, match=r"timed out after 0\.2 s"):
                        await batch.set(4)
                    assert time.monotonic() - t0 < 2 * 0.2 + 1.0
                else:
                    with pytest.raises(BatchLimitRejected, match="HTTP 409: Conflict"):
                        await batch.get()
            finally:
                batch.close()
