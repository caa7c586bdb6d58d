"""A lean HTTP/1.1 client over one kept-alive asyncio connection: how palsd scrapes /metrics
and calls the batch-limit endpoint.

Why not httpx here: a daemon scrapes every server every tick (16 pages of ~50 KB a second for
8 servers at 2 Hz) and reads each server's batch limit every few seconds, and httpx's layers
(URL model, auth and redirect handling, anyio streams, a connection pool) cost about 3 ms of
CPU per request, more than parsing a page. This is only what those calls need: one connection
per URL, `METHOD path` with fixed headers and an optional body, a status line, headers, a body
sized by Content-Length, chunks or the connection's close. httpx stays where calls are rare.

Rules of this file:
- One request at a time per `PageGetter`, bounded by `timeout_s` per attempt (connect, send
  and read together); a connection that timed out, failed or was cancelled mid-answer is
  closed, never reused.
- A GET on a kept-alive connection that the server dropped without answering (uvicorn closes
  idle ones after 5 s) is sent once more on a fresh connection (`reconnects` counts them);
  a GET is safe to repeat, and one repeat bounds the cost. Any other method is not repeated
  here: the error goes to the caller, who decides (the batch-limit client retries a PUT).
- A body above `max_bytes` is refused, not read.
- Errors are `HttpGetError` with a message for logs and status; a timeout is `HttpGetTimeout`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

MAX_BYTES = 16 * 1024 * 1024  # a vLLM page is ~50 KB; anything near this is not one


class HttpGetError(Exception):
    """The GET got no usable answer: unreachable, dropped, malformed or too large."""


class HttpGetTimeout(HttpGetError):
    """No complete answer within the timeout."""


class _Dropped(HttpGetError):
    """The server closed a kept-alive connection before answering (safe to send again)."""


@dataclass(frozen=True)
class Page:
    status: int
    body: bytes
    reason: str = ""  # the status line's phrase ("Not Found"); the standard one if it had none

    @property
    def text(self) -> str:
        # As httpx decodes a text body without a charset it knows: UTF-8, bad bytes replaced.
        return self.body.decode("utf-8", errors="replace")


class PageGetter:
    """Requests to one URL over one kept-alive connection: GETs of a page, and the few other
    calls of a small JSON endpoint. `headers` go with every request (e.g. Authorization)."""

    def __init__(
        self,
        url: str,
        max_bytes: int = MAX_BYTES,
        headers: Mapping[str, str] | None = None,
        accept: str = "text/plain, */*",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rsplit("@", 1)[-1]  # never send credentials in the Host header
        fixed = {"Host": netloc, "Accept": accept, "User-Agent": "palsd", **(headers or {})}
        for name, value in fixed.items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break or NUL")
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._get_request = self._request_bytes("GET", None, "")
        self.max_bytes = max_bytes
        self.reconnects = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, timeout_s: float) -> Page:
        """One GET; raises HttpGetError (HttpGetTimeout when no answer came in time)."""
        return await self._send(self._get_request, timeout_s, repeatable=True)

    async def request(
        self,
        method: str,
        timeout_s: float,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Page:
        """One request of `method` with `body` (sent with `content_type`); raises HttpGetError
        (HttpGetTimeout when no answer came in time). Only a GET is sent twice (see above)."""
        request = self._request_bytes(method, body, content_type)
        return await self._send(request, timeout_s, repeatable=method == "GET")

    def _request_bytes(self, method: str, body: bytes | None, content_type: str) -> bytes:
        if body is None:
            return f"{method} {self._path} HTTP/1.1\r\n{self._headers}\r\n".encode("latin-1")
        head = (
            f"{method} {self._path} HTTP/1.1\r\n{self._headers}"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def _send(self, request: bytes, timeout_s: float, repeatable: bool) -> Page:
        reused = self._writer is not None and not self._reader_at_eof()
        if not reused:
            self.close()
        try:
            return await self._attempt(request, timeout_s)
        except _Dropped:
            if not (reused and repeatable):
                raise
            self.reconnects += 1
            return await self._attempt(request, timeout_s)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _reader_at_eof(self) -> bool:
        return self._reader is None or self._reader.at_eof()

    async def _attempt(self, request: bytes, timeout_s: float) -> Page:
        done = False
        try:
            async with asyncio.timeout(timeout_s):
                page, keep = await self._exchange(request)
            done = True
            return page
        except TimeoutError:
            raise HttpGetTimeout(f"timeout after {timeout_s:g} s") from None
        except asyncio.IncompleteReadError as e:
            raise _Dropped(f"connection closed after {len(e.partial)} bytes") from None
        except ConnectionError as e:  # reset or broken pipe: dropped if it was kept alive
            raise _Dropped(f"{type(e).__name__}: {e}") from e
        except OSError as e:
            raise HttpGetError(f"{type(e).__name__}: {e}") from e
        except (ValueError, asyncio.LimitOverrunError) as e:
            raise HttpGetError(f"malformed answer: {e}") from e
        finally:
            if not done or not keep:
                self.close()  # half-read, failed or cancelled: its state is unknown

    async def _exchange(self, request: bytes) -> tuple[Page, bool]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=ssl.create_default_context() if self._tls else None,
                limit=2**16,
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, _, header_block = head.decode("latin-1").partition("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        status = int(rest[:3])
        reason = rest[4:].strip() or _standard_phrase(status)
        headers: dict[str, str] = {}
        for line in header_block.split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._chunked(reader)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length > self.max_bytes:
                raise ValueError(f"body of {length} bytes: over the {self.max_bytes} bytes allowed")
            body = await reader.readexactly(length)
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # the body runs to the close
            body = await reader.read(self.max_bytes + 1)
            while len(body) <= self.max_bytes and not reader.at_eof():
                more = await reader.read(self.max_bytes + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > self.max_bytes:
                raise ValueError(f"body over the {self.max_bytes} bytes allowed")
            keep = False
        return Page(status, body, reason), keep

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers: none palsd needs
                return b"".join(parts)
            total += size
            if total > self.max_bytes:
                raise ValueError(f"body over the {self.max_bytes} bytes allowed")
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise ValueError("chunk not followed by CRLF")


def _standard_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
