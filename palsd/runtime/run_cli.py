"""`palsd run`: start the daemon, serve the API and metrics, restore every limit on the way out.

Signal handlers only set events; all hardware work happens in the main task.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from palsd import __version__
from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.api.server import ApiServer
from palsd.config import DEFAULT_CONFIG_PATH, ConfigError, PalsdConfig, load_config
from palsd.core.budget import BudgetBook
from palsd.errors import GpuError
from palsd.report.logs import configure_logging, get_logger
from palsd.report.metrics import Metrics
from palsd.runtime.daemon import Daemon
from palsd.runtime.instance_lock import claim
from palsd.runtime.notify import Notifier
from palsd.runtime.wiring import make_backend, make_controller, make_server_links, read_secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    parser.add_argument(
        "--dry-run", action="store_true", help="force dry run whatever the config says"
    )


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(err.report(), file=sys.stderr)
        return 2
    if args.dry_run:
        cfg = cfg.model_copy(update={"control": cfg.control.model_copy(update={"dry_run": True})})
    # Before anything is touched: one instance per state dir, and no foreign file at api.socket.
    lock = claim("run", cfg.state.dir, cfg.api.socket)
    if lock is None:
        return 2
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        return asyncio.run(serve(cfg, args.config))
    except KeyboardInterrupt:
        return 0
    finally:
        lock.release()


async def _start_metrics(cfg: PalsdConfig, metrics: Metrics, log: Any) -> web.AppRunner | None:
    if not cfg.metrics.enabled:
        return None

    async def handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.metrics.host, cfg.metrics.port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else cfg.metrics.port
    log.info("metrics_listening", host=cfg.metrics.host, port=port)
    return runner


async def reconcile(store: OriginalsStore, backend: Any, links: list[Any], log: Any) -> None:
    """Put back what a previous run left behind (it crashed or was killed) before starting."""
    try:
        previous = store.load()
    except (ValueError, KeyError, TypeError) as err:
        log.error(
            "originals_record_unreadable",
            path=str(store.path),
            error=str(err),
            action="left in place; run `palsd restore` after inspecting it",
        )
        return
    if previous is None or previous.empty():
        return
    result = await put_back(previous, store, backend, _ports(links), log)
    log.warning(
        "reconciled_previous_run",
        restored_gpus=sorted(result.applied),
        failed=result.failed,
        left=previous.to_json(),
    )


def _ports(links: list[Any]) -> dict[str, Any]:
    return {link.name: link.batch for link in links}


async def serve(cfg: PalsdConfig, config_path: Path) -> int:
    log = get_logger()
    metrics = Metrics()
    metrics.info.info(
        {"version": __version__, "backend": cfg.gpu.backend, "controller": cfg.control.controller}
    )
    metrics.dry_run.set(1 if cfg.control.dry_run else 0)
    backend = make_backend(cfg)
    try:
        await asyncio.to_thread(backend.read_all)
    except GpuError as err:
        log.error("gpu_backend_unavailable", error=str(err))
        return 1
    store = OriginalsStore(cfg.state.dir)
    actuator = PowerActuator(backend, store, metrics, log, cfg.control.dry_run)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    notifier = Notifier()

    async with httpx.AsyncClient() as client:
        links = make_server_links(cfg, client)
        if not cfg.control.dry_run:
            await reconcile(store, backend, links, log)

        def record_batch_original(name: str, url: str, limit: int) -> None:
            actuator.record_server(name, url, limit)  # durable first; False: not recorded

        daemon = Daemon(
            backend=backend,
            actuator=actuator,
            controller=make_controller(cfg),
            servers=links,
            book=BudgetBook(
                cfg.budget.default_w, cfg.budget.fallback_w, facility_expected=cfg.mqtt.enabled
            ),
            metrics=metrics,
            log=log,
            period_s=cfg.control.period_s,
            notifier=notifier,
            on_batch_original=record_batch_original,
        )
        api = ApiServer(
            daemon,
            cfg.api.socket,
            cfg.api.admin_group,
            tcp=(cfg.api.tcp.host, cfg.api.tcp.port) if cfg.api.tcp.enabled else None,
            token=read_secret(cfg.api.tcp.token_file),
            max_override_ttl_s=cfg.budget.max_override_ttl_s,
        )
        await api.start()
        if api.tcp_port is not None:
            log.info("api_tcp_listening", host=cfg.api.tcp.host, port=api.tcp_port)
        metrics_runner = await _start_metrics(cfg, metrics, log)
        log.info(
            "palsd_started",
            version=__version__,
            backend=backend.name,
            dry_run=cfg.control.dry_run,
            controller=daemon.controller.name,
            socket=str(cfg.api.socket),
            servers=[s.name for s in links],
            period_s=cfg.control.period_s,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(daemon.run(stop), name="control-loop")
                tg.create_task(
                    _reloader(reload_requested, stop, config_path, cfg, daemon, metrics, log),
                    name="reloader",
                )
                if cfg.mqtt.enabled:
                    tg.create_task(_run_feed(cfg, daemon, metrics, stop), name="mqtt-feed")
        finally:
            notifier.stopping()
            await daemon.close_batch_tasks()
            await api.stop()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            await _restore_all(actuator, store, backend, links, log)
            backend.close()
    log.info("palsd_stopped")
    return 0


async def _run_feed(
    cfg: PalsdConfig, daemon: Daemon, metrics: Metrics, stop: asyncio.Event
) -> None:
    from palsd.feed.mqtt import MqttFeed

    feed = MqttFeed(
        cfg.mqtt,
        daemon,
        daemon.status,
        metrics.registry,
        seq_path=cfg.state.dir / "mqtt-seq.json",
    )
    daemon.status_extra["feed"] = feed.state
    task = asyncio.create_task(feed.run(), name="mqtt-client")
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _restore_all(
    actuator: PowerActuator, store: OriginalsStore, backend: Any, links: list[Any], log: Any
) -> None:
    if actuator.dry_run:
        return
    result = await put_back(actuator.originals, store, backend, _ports(links), log)
    log.info("limits_restored", gpus=sorted(result.applied), failed=result.failed)


async def _reloader(
    requested: asyncio.Event,
    stop: asyncio.Event,
    path: Path,
    running: PalsdConfig,
    daemon: Daemon,
    metrics: Metrics,
    log: Any,
) -> None:
    while not stop.is_set():
        waiter = asyncio.ensure_future(requested.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        if stop.is_set():
            return
        requested.clear()
        try:
            new = load_config(path)
        except ConfigError as err:
            metrics.config_reloads.labels("rejected").inc()
            log.error(
                "config_reload_rejected",
                problems=err.problems,
                action="the running configuration stays in force",
            )
            continue
        daemon.replace_book_config(new.budget.default_w, new.budget.fallback_w)
        daemon.period_s = new.control.period_s
        restart_needed = [
            key
            for key in ("gpu", "servers", "api", "metrics", "state", "mqtt")
            if getattr(new, key) != getattr(running, key)
        ]
        if new.control.dry_run != running.control.dry_run:
            restart_needed.append("control.dry_run")
        metrics.config_reloads.labels("applied").inc()
        log.info(
            "config_reloaded", applied=["budget", "control.period_s"], needs_restart=restart_needed
        )
        running = new
