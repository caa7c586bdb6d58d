"""palsd's lean /metrics GET (palsd.sense.http_get) against real HTTP servers: it reads what httpx
reads (the real vLLM 0.32 page and the sim host's pages parse to identical values), keeps one
connection alive across scrapes, and handles the framings and failures a server can give it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from palsd.sense.http_get import HttpGetError, HttpGetTimeout, PageGetter
from palsd.sense.vllm import VllmScraper
from palsd.sense.vllm_metrics import parse_metrics
from tests.integration.procs import sim_host
from tests.unit.test_vllm_metrics import v1_page

FIXTURE = Path(__file__).parents[1] / "unit" / "data" / "vllm-0.32.0-cpu-metrics.txt"
Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handle: Handle) -> AsyncIterator[str]:
    """A server that answers each connection with `handle` (bytes exactly as written)."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def test_the_real_vllm_page_reads_as_httpx_reads_it() -> None:
    page = FIXTURE.read_text()
    connections = 0

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    getter = PageGetter(url)
    try:
        async with httpx.AsyncClient() as client:
            want = (await client.get(url)).text
        for _ in range(3):  # one kept-alive connection, three scrapes
            got = await getter.get(timeout_s=5.0)
            assert (got.status, got.text) == (200, want)
            assert parse_metrics(got.text) == parse_metrics(want) == parse_metrics(page)
        connections = len(runner.server.connections) if runner.server else 0
    finally:
        getter.close()
        await runner.cleanup()
    assert connections == 1 and getter.reconnects == 0


def test_sim_host_pages_read_as_httpx_reads_them(tmp_path: Path) -> None:
    async def compare(urls: list[str]) -> None:
        async with httpx.AsyncClient() as client:
            for url in urls:
                scraper = VllmScraper(url, timeout_s=5.0)
                try:
                    got = await scraper._getter.get(5.0)
                    want = (await client.get(scraper.url, timeout=5.0)).text
                finally:
                    scraper.close()
                assert got.status == 200
                # The sim's counters move between two GETs: the same families, engines and
                # histogram bounds, and the parse of each body equals itself read either way.
                assert got.text.splitlines()[0] == want.splitlines()[0]
                ours, theirs = parse_metrics(got.text), parse_metrics(want)
                assert ours.keys() == theirs.keys() and ours
                for key in ours:
                    assert ours[key].ttft is not None and theirs[key].ttft is not None
                    assert ours[key].ttft.bounds == theirs[key].ttft.bounds

    with sim_host(tmp_path, gpus=4, servers=2) as sim:
        asyncio.run(compare([s["url"] for s in sim["servers"]]))


async def test_chunked_and_close_delimited_bodies() -> None:
    body = b'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # kept alive: both GETs on this one connection
            await reader.readuntil(b"\r\n\r\n")
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"10;x=y\r\n" + body[:16] + b"\r\n")
            writer.write(f"{len(body) - 16:x}\r\n".encode() + body[16:] + b"\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    for handle in (chunked, until_close):
        async with raw_server(handle) as url:
            getter = PageGetter(url)
            page = await getter.get(timeout_s=5.0)
            assert (page.status, page.body) == (200, body)
            assert await getter.get(timeout_s=5.0) == page
            assert getter.reconnects == 0
            getter.close()


async def test_a_body_over_the_cap_is_refused_unread() -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\nvllm:")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()

    async with raw_server(huge) as url:
        getter = PageGetter(url, max_bytes=1000)
        with pytest.raises(HttpGetError, match="over the 1000 bytes allowed"):
            await getter.get(timeout_s=5.0)


async def test_garbage_and_silence_are_errors_not_hangs() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with raw_server(garbage) as url:
        with pytest.raises(HttpGetError, match="bad status line"):
            await PageGetter(url).get(timeout_s=5.0)
    async with raw_server(silent) as url:
        getter = PageGetter(url)
        with pytest.raises(HttpGetTimeout, match=r"timeout after 0\.2 s"):
            await getter.get(timeout_s=0.2)
        assert getter._writer is None  # a half-done exchange is never reused


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        PageGetter("unix:///run/vllm.sock")


async def test_a_restarted_server_is_seen_on_its_page() -> None:
    """A new process_start_time_seconds, or (without it) a counter going back, counts one
    restart; the same process scraped again counts none."""
    pages = [
        "process_start_time_seconds 100.0\n" + v1_page(gen=1000.0),
        "process_start_time_seconds 100.0\n" + v1_page(gen=2000.0),
        "process_start_time_seconds 250.0\n" + v1_page(gen=10.0),
        v1_page(gen=20.0),  # no process collector: counters only
        v1_page(gen=5.0),
    ]

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=pages.pop(0))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    scraper = VllmScraper(f"http://127.0.0.1:{runner.addresses[0][1]}", timeout_s=5.0)
    seen = []
    try:
        for at_s in range(5):
            assert await scraper.poll(float(at_s)) is not None, scraper.stale_reason
            seen.append(scraper.restarts)
    finally:
        scraper.close()
        await runner.cleanup()
    assert seen == [0, 0, 1, 1, 2]
