"""`palsd coordinator --config FILE`: run the fleet coordinator of one group (docs/fleet.md).

Signal handlers only set an event; the service's task is cancelled from the main task, which
publishes "offline" on the coordinator's state topic on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web

from palsd.config import ConfigError
from palsd.fleet.config import (
    DEFAULT_COORDINATOR_CONFIG,
    CoordinatorConfig,
    load_coordinator_config,
)
from palsd.fleet.service import CoordinatorService
from palsd.report.logs import configure_logging, get_logger
from palsd.report.metrics_http import serve_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_COORDINATOR_CONFIG)
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print problems, exit"
    )


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_coordinator_config(args.config)
    except ConfigError as err:
        print(err.report(), file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok ({len(cfg.members)} members, group {cfg.group})")
        return 0
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        return asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 0


async def serve(cfg: CoordinatorConfig) -> int:
    log = get_logger("palsd.coordinator")
    service = CoordinatorService(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    if cfg.metrics.enabled:

        async def status(_: web.Request) -> web.Response:
            return web.json_response(service.status())

        runner = await serve_metrics(
            service.registry, cfg.metrics.host, cfg.metrics.port, log, {"/status": status}
        )
    log.info(
        "coordinator_started",
        coordinator=cfg.coordinator_id,
        group=service.group_topic,
        members=len(cfg.members),
        ttl_s=cfg.allocation.ttl_s,
    )
    task = asyncio.create_task(service.run(), name="coordinator")
    await stop.wait()
    task.cancel()
    await asyncio.wait([task], timeout=3.0)
    if runner is not None:
        await runner.cleanup()
    log.info("coordinator_stopped")
    return 0
