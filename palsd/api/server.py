"""Local API server (aiohttp). Reads are open to every local caller; changes need authority.

The rules of this file (the API faces every local user, so it assumes some are hostile):
- Errors are JSON {"error": message, "reason": label}; every refusal is counted in
  palsd_api_rejected_total{reason} and logged as one line, at most one per reason every
  LOG_EVERY_S (with how many were suppressed): a client's fault never writes a traceback and
  never floods the log.
- A request body is validated by a strict pydantic model (OverrideRequest): unknown fields,
  strings for numbers, booleans, non-finite or out-of-range numbers, a 5,000-digit integer: each
  is a counted 400, never a 500. Bodies are capped at ApiLimits.max_body_bytes (413).
- Connections are bounded: at most ApiLimits.max_connections_per_peer open at once per peer
  (the uid on the Unix socket, root counted per process; the address on TCP) and
  max_connections in all; the excess is answered 503 at once and closed. One request per
  connection, and the whole exchange (headers, body, answer) must finish within
  request_timeout_s or the connection is dropped: an idle or slow client holds nothing for long,
  so a flood of idle connections never exhausts palsd's file descriptors.
- A change whose client has already gone (closed its end while the request waited) is not
  applied: nobody asked for it any more.
- The server talks to the daemon through DaemonControl (palsd/runtime/control.py), a small
  protocol, not Daemon's internals.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from palsd.api.auth import peer_of, token_ok, uid_may_change
from palsd.core.budget import BudgetEntry
from palsd.report.logs import LogLimiter
from palsd.runtime.control import DaemonControl
from palsd.runtime.instance_lock import StartRefused

LOG_EVERY_S = 10.0
MAX_OVERRIDE_TTL_S = 366 * 86_400.0  # whatever the config says, an override ends within a year


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 4096
    request_timeout_s: float = 10.0
    max_connections_per_peer: int = 32
    max_connections: int = 256
    max_header_bytes: int = 4096


class OverrideRequest(BaseModel):
    """PUT /v1/budget/override. Strict: 5 and 5.0 are numbers, "5" and true are not."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    budget_w: float = Field(gt=0, le=1_000_000)
    ttl_s: float | None = Field(None, gt=0, le=MAX_OVERRIDE_TTL_S)
    reason: str | None = Field(None, max_length=200)


def check_socket_path(path: Path) -> None:
    """Raise StartRefused unless `path` is free or palsd's own stale socket: a socket file
    (not a regular file, a link or anything else) with no live listener. Touches nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise StartRefused(f"api.socket {path}: cannot inspect it: {err.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartRefused(
            f"api.socket {path} exists and is not a socket; refusing to replace it "
            "(choose another path or remove the file yourself)"
        )
    if _socket_is_live(path):
        raise StartRefused(f"api.socket {path} is in use by a live listener")


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # full backlog, timeout, permission: someone is there, leave it alone
    finally:
        probe.close()
    return True


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


class _Throttle:
    """One log line per reason per LOG_EVERY_S; the rest are counted and summed into the next."""

    def __init__(self, log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._limiter = LogLimiter(burst=1, window_s=LOG_EVERY_S)

    def warning(self, event: str, reason: str, **fields: Any) -> None:
        suppressed = self._limiter.allow(reason, self._clock())
        if suppressed is not None:
            self._log.warning(event, reason=reason, suppressed_since_last=suppressed, **fields)


class _Guard:
    """Connection accounting shared by every listener of one ApiServer."""

    def __init__(self, limits: ApiLimits, refuse: Callable[[str, str], None]) -> None:
        self.limits = limits
        self.refuse = refuse
        self.open: dict[Any, int] = {}
        self.total = 0

    def admit(self, peer: Any) -> str | None:
        """None when the connection may stay, else the refusal reason."""
        if self.total >= self.limits.max_connections:
            return "too_many_connections"
        if self.open.get(peer, 0) >= self.limits.max_connections_per_peer:
            return "too_many_connections_from_peer"
        self.open[peer] = self.open.get(peer, 0) + 1
        self.total += 1
        return None

    def release(self, peer: Any) -> None:
        left = self.open.get(peer, 0) - 1
        if left > 0:
            self.open[peer] = left
        else:
            self.open.pop(peer, None)
        self.total -= 1


_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _fit_to_descriptors(limits: ApiLimits) -> ApiLimits:
    """Never promise more connections than the descriptor limit allows: half of what is left
    after a reserve for NVML, scrapes, MQTT and files, and at least a few."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits
    room = max(8, (soft - 128) // 2)
    if room >= limits.max_connections:
        return limits
    return replace(
        limits,
        max_connections=room,
        max_connections_per_peer=min(limits.max_connections_per_peer, room),
    )


def _peer_key(transport: asyncio.BaseTransport) -> Any:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        peer = peer_of(sock)
        if peer is None:
            return ("uid", None)
        # Root can stop palsd anyway; counting root per process keeps one runaway root tool
        # from locking out root's palsctl. Every other user is counted by uid.
        return ("uid", peer.uid, peer.pid) if peer.uid == 0 else ("uid", peer.uid)
    name = transport.get_extra_info("peername")
    return ("addr", name[0] if isinstance(name, tuple) else name)


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _GuardedHandler(RequestHandler):
    """aiohttp's protocol with an admission check and a whole-exchange deadline."""

    def __init__(self, manager: web.Server, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._peer: Any = None
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._quiet = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._peer = _peer_key(transport)
        refused = self._guard.admit(self._peer)
        if refused is not None:
            body = (
                b'{"error": "too many open connections; try again shortly", '
                b'"reason": "' + refused.encode() + b'"}'
            )
            transport.write(_BUSY % (len(body), body))
            transport.close()
            self._guard.refuse(refused, f"peer {self._peer}")
            return
        self._admitted = True
        self._deadline = self._loop.call_later(
            self._guard.limits.request_timeout_s, self._expire, transport
        )
        super().connection_made(transport)

    def _expire(self, transport: asyncio.Transport) -> None:
        self._deadline = None
        if not transport.is_closing():
            self._guard.refuse("timeout", f"peer {self._peer}")
            transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._guard.release(self._peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            super().data_received(data)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # palsd's own bug
        # A malformed request or oversized headers: the client's fault, one counted line.
        self._guard.refuse("bad_http", str(message or exc or status)[:200])
        self._quiet = True
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self._quiet = False

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if not self._quiet:
            super().log_exception(*args, **kw)


class ApiServer:
    def __init__(
        self,
        daemon: DaemonControl,
        socket_path: Path,
        admin_group: str | None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
        max_override_ttl_s: float | None = None,
        limits: ApiLimits | None = None,
    ) -> None:
        self.daemon = daemon
        self.socket_path = Path(socket_path)
        self.admin_group = admin_group
        self.tcp = tcp
        self.token = token
        self.max_override_ttl_s = max_override_ttl_s
        self.limits = limits or ApiLimits()
        self._runner: web.AppRunner | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._socket_inode: int | None = None
        self.tcp_port: int | None = None
        self._throttle = _Throttle(daemon.log)
        self._previous_handler: Any = None
        self._guard = _Guard(self.limits, self._refused_connection)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=self.limits.max_body_bytes)
        app.router.add_get("/v1/status", self.get_status)
        app.router.add_get("/v1/health", self.get_health)
        app.router.add_put("/v1/budget/override", self.put_override)
        app.router.add_delete("/v1/budget/override", self.delete_override)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            max_line_size=self.limits.max_header_bytes,
            max_field_size=self.limits.max_header_bytes,
            max_headers=32,
        )
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._guard.limits = _fit_to_descriptors(self.limits)
        # Out of descriptors anyway (something else used them): asyncio pauses accepting for
        # 1 s and reports it with a traceback each time; make that one counted line.
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        check_socket_path(self.socket_path)
        self.socket_path.unlink(missing_ok=True)  # palsd's own stale socket (checked above)
        unix = await loop.create_unix_server(self._protocol, str(self.socket_path), backlog=128)
        self._listeners.append(unix)
        os.chmod(self.socket_path, 0o666)  # reads for every local user; changes are checked
        self._socket_inode = os.lstat(self.socket_path).st_ino
        if self.tcp is not None:
            tcp = await loop.create_server(self._protocol, self.tcp[0], self.tcp[1], backlog=128)
            self._listeners.append(tcp)
            self.tcp_port = tcp.sockets[0].getsockname()[1] if tcp.sockets else self.tcp[1]

    def _protocol(self) -> _GuardedHandler:
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        # What web.Server() does for a new connection, with the guard in front.
        return _GuardedHandler(server, self._guard, loop=server._loop, **server._kwargs)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        accepting = "accept" in str(context.get("message", ""))
        if accepting and isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            self.daemon.metrics.api_rejected.labels("out_of_descriptors").inc()
            self._throttle.warning(
                "api_accept_failed",
                "out_of_descriptors",
                detail=f"{context.get('message', '')}: {exc.strerror}",
                action="accepting again in 1 s",
            )
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() == self._loop_exception:
            loop.set_exception_handler(self._previous_handler)
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        # Only our own socket: never a file someone put there after we bound.
        try:
            if self._socket_inode is not None and os.lstat(self.socket_path).st_ino == (
                self._socket_inode
            ):
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.force_close()  # one request per connection: nothing idles on a kept-alive one
        self.daemon.metrics.api_requests.labels(request.method, str(response.status)).inc()
        return response

    def _refused_connection(self, reason: str, detail: str) -> None:
        self.daemon.metrics.api_rejected.labels(reason).inc()
        self._throttle.warning("api_connection_refused", reason, detail=detail)

    def _authorised(self, request: web.Request) -> str | None:
        """None when the caller may change things, else the refusal reason."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        peer = peer_of(sock)
        if peer is not None:
            if uid_may_change(peer.uid, peer.gid, self.admin_group):
                return None
            return "forbidden"
        if token_ok(request.headers.get("Authorization"), self.token):
            return None
        return "unauthorised"

    def _refuse(self, reason: str, message: str, status: int = 400) -> web.Response:
        self.daemon.metrics.api_rejected.labels(reason).inc()
        self._throttle.warning("api_request_rejected", reason, detail=message[:300])
        return _error(status, reason, message)

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.daemon.status())

    async def get_health(self, request: web.Request) -> web.Response:
        health = self.daemon.health()
        return web.json_response(health, status=200 if health["ok"] else 503)

    async def put_override(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return self._refuse(
                refused,
                "changing the budget needs root, membership of the admin group "
                f"({self.admin_group!r}) or, on TCP, the bearer token",
                403 if refused == "forbidden" else 401,
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(
                "too_large", f"the body exceeds {self.limits.max_body_bytes} bytes", 413
            )
        try:
            body = OverrideRequest.model_validate_json(raw)
        except ValidationError as err:
            kinds = {e["type"] for e in err.errors()}
            reason = "bad_json" if kinds & {"json_invalid", "json_type"} else "bad_value"
            return self._refuse(reason, _validation_message(err))
        if body.ttl_s is None and self.max_override_ttl_s is not None:
            return self._refuse(
                "bad_value", "ttl_s is required (budget.max_override_ttl_s is configured)"
            )
        if (
            body.ttl_s is not None
            and self.max_override_ttl_s is not None
            and body.ttl_s > self.max_override_ttl_s
        ):
            return self._refuse(
                "bad_value",
                f"ttl_s {body.ttl_s} exceeds budget.max_override_ttl_s {self.max_override_ttl_s}",
            )
        if _client_gone(request):
            return self._refuse("client_gone", "the client closed the connection; not applied")
        now = self.daemon.now()
        entry = BudgetEntry(
            watts=body.budget_w,
            expires_at=None if body.ttl_s is None else now + body.ttl_s,
            reason=body.reason or "palsctl set-budget",
            set_at=now,
            origin="local-api",
        )
        budget = self.daemon.set_override(entry)
        self.daemon.log.info("budget_override_set", budget_w=entry.watts, ttl_s=body.ttl_s)
        return web.json_response(
            {"budget": self.daemon.status()["budget"], "effective_w": budget.effective_w}
        )

    async def delete_override(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return self._refuse(
                refused,
                "clearing the budget override needs authority",
                403 if refused == "forbidden" else 401,
            )
        if _client_gone(request):
            return self._refuse("client_gone", "the client closed the connection; not applied")
        self.daemon.set_override(None)
        self.daemon.log.info("budget_override_cleared")
        return web.json_response({"budget": self.daemon.status()["budget"]})


def _client_gone(request: web.Request) -> bool:
    """True when the client has closed its end: a change it no longer waits for (it timed
    out, or was queued behind a flood) must not be applied."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        # asyncio hands out a restricted socket object without recv(): peek through a dup.
        with socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno())) as peek:
            # The request is read; what is left on the socket is an EOF if the client closed.
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset by the peer (or no descriptor left to look with: do not apply)
