"""`palsd restore`: put back the limits recorded in the state directory (systemd's
ExecStopPost runs it, so limits come back even after SIGKILL)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx

from palsd.act.originals import OriginalsStore
from palsd.act.power import restore_gpus
from palsd.errors import GpuError
from palsd.report.logs import configure_logging, get_logger
from palsd.runtime.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from palsd.runtime.wiring import make_backend, make_server_links


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"{err.source}: configuration rejected: {'; '.join(err.problems)}", file=sys.stderr)
        return 2
    configure_logging(cfg.logging.level, cfg.logging.format)
    log = get_logger()
    store = OriginalsStore(cfg.state.dir)
    try:
        originals = store.load()
    except (ValueError, KeyError, TypeError) as err:
        print(f"palsd restore: {store.path} is unreadable: {err}", file=sys.stderr)
        return 1
    if originals is None or originals.empty():
        log.info("nothing_to_restore", path=str(store.path))
        return 0
    backend = make_backend(cfg)
    try:
        targets = {i: float(e["limit_w"]) for i, e in originals.gpus.items()}
        result = restore_gpus(backend, targets, log)
    except GpuError as err:
        print(f"palsd restore: {err}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    for index in result.applied:
        originals.gpus.pop(index, None)

    async def restore_batches() -> None:
        async with httpx.AsyncClient() as client:
            for link in make_server_links(cfg, client):
                entry = originals.servers.get(link.name)
                if entry is None:
                    continue
                try:
                    await link.batch.set(int(entry["batch_limit"]))
                    originals.servers.pop(link.name)
                    log.info("batch_limit_restored", server=link.name, limit=entry["batch_limit"])
                except Exception as err:
                    log.error("batch_limit_restore_failed", server=link.name, error=str(err))

    if originals.servers:
        asyncio.run(restore_batches())
    if originals.empty():
        store.clear()
        log.info("restored", gpus=sorted(result.applied))
        return 0
    store.save(originals)
    print(
        f"palsd restore: some limits could not be restored: {originals.to_json()}", file=sys.stderr
    )
    return 1
