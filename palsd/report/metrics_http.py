"""The one way palsd serves Prometheus metrics over HTTP (the daemon and the coordinator)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    log: Any,
    extra: dict[str, Handler] | None = None,
) -> web.AppRunner:
    """Serve GET /metrics (and any `extra` GET routes) on host:port; logs the bound port as
    `metrics_listening` (port 0 picks a free one). The caller cleans the runner up."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    for path, handler in (extra or {}).items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("metrics_listening", host=host, port=bound)
    return runner
