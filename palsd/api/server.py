"""Local API server (aiohttp). Reads are open to every local caller; changes need authority.

Errors are JSON {"error": message, "reason": label}; every refusal is counted by reason.
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
from pathlib import Path
from typing import Any

from aiohttp import web

from palsd.api.auth import peer_of, token_ok, uid_may_change
from palsd.core.budget import BudgetEntry
from palsd.runtime.control import DaemonControl
from palsd.runtime.instance_lock import StartRefused


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


def _remove_stale_socket(path: Path) -> None:
    check_socket_path(path)
    path.unlink(missing_ok=True)


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


class ApiServer:
    def __init__(
        self,
        daemon: DaemonControl,
        socket_path: Path,
        admin_group: str | None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
        max_override_ttl_s: float | None = None,
    ) -> None:
        self.daemon = daemon
        self.socket_path = Path(socket_path)
        self.admin_group = admin_group
        self.tcp = tcp
        self.token = token
        self.max_override_ttl_s = max_override_ttl_s
        self._runner: web.AppRunner | None = None
        self._socket_inode: int | None = None
        self.tcp_port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/v1/status", self.get_status)
        app.router.add_get("/v1/health", self.get_health)
        app.router.add_put("/v1/budget/override", self.put_override)
        app.router.add_delete("/v1/budget/override", self.delete_override)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(self.socket_path)
        site = web.UnixSite(self._runner, str(self.socket_path))
        await site.start()
        os.chmod(self.socket_path, 0o666)  # reads for every local user; changes are checked
        self._socket_inode = os.lstat(self.socket_path).st_ino
        if self.tcp is not None:
            tcp_site = web.TCPSite(self._runner, self.tcp[0], self.tcp[1])
            await tcp_site.start()
            server = tcp_site._server
            sockets = getattr(server, "sockets", None) or []
            self.tcp_port = sockets[0].getsockname()[1] if sockets else self.tcp[1]

    async def stop(self) -> None:
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
        self.daemon.metrics.api_requests.labels(request.method, str(response.status)).inc()
        return response

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
        self.daemon.log.warning("api_request_rejected", reason=reason, detail=message)
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
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._refuse("bad_json", "the body is not JSON")
        problem = self._check_override(body)
        if problem is not None:
            return self._refuse("bad_value", problem)
        now = self.daemon.now()
        ttl = body.get("ttl_s")
        entry = BudgetEntry(
            watts=float(body["budget_w"]),
            expires_at=None if ttl is None else now + float(ttl),
            reason=str(body.get("reason") or "palsctl set-budget"),
            set_at=now,
            origin="local-api",
        )
        budget = self.daemon.set_override(entry)
        self.daemon.log.info("budget_override_set", budget_w=entry.watts, ttl_s=ttl)
        return web.json_response(
            {"budget": self.daemon.status()["budget"], "effective_w": budget.effective_w}
        )

    def _check_override(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "the body must be a JSON object"
        unknown = set(body) - {"budget_w", "ttl_s", "reason"}
        if unknown:
            return f"unknown fields: {sorted(unknown)}; allowed: budget_w, ttl_s, reason"
        watts = body.get("budget_w")
        if isinstance(watts, bool) or not isinstance(watts, int | float):
            return f"budget_w must be a number of watts, got {watts!r}"
        if not math.isfinite(watts) or watts <= 0 or watts > 1_000_000:
            return f"budget_w must be a finite number in (0, 1000000], got {watts!r}"
        ttl = body.get("ttl_s")
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, int | float):
                return f"ttl_s must be a number of seconds or null, got {ttl!r}"
            if not math.isfinite(ttl) or ttl <= 0:
                return f"ttl_s must be a positive, finite number of seconds, got {ttl!r}"
            if self.max_override_ttl_s is not None and ttl > self.max_override_ttl_s:
                return f"ttl_s {ttl} exceeds budget.max_override_ttl_s {self.max_override_ttl_s}"
        elif self.max_override_ttl_s is not None:
            return "ttl_s is required (budget.max_override_ttl_s is configured)"
        reason = body.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
            return "reason must be a string of at most 200 characters"
        return None

    async def delete_override(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return self._refuse(
                refused,
                "clearing the budget override needs authority",
                403 if refused == "forbidden" else 401,
            )
        self.daemon.set_override(None)
        self.daemon.log.info("budget_override_cleared")
        return web.json_response({"budget": self.daemon.status()["budget"]})
