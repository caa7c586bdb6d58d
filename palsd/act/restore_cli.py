"""`palsd restore`: put back the limits recorded in the state directory (systemd's
ExecStopPost runs it, so limits come back even after SIGKILL). It refuses (exit 2, nothing
changed) while a daemon holds the state directory's instance lock.

The exit status says whether the limits are back: 0 when every one is, even if the record
could not be removed (read-only state directory; put_back warns `originals_record_left`), 1
when one is not (it is named on stderr and stays recorded)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.config import DEFAULT_CONFIG_PATH, ConfigError, PalsdConfig, load_config
from palsd.errors import GpuError
from palsd.report.logs import configure_logging, get_logger
from palsd.report.metrics import Metrics
from palsd.runtime.instance_lock import claim
from palsd.runtime.wiring import make_backend, make_batch_ports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, check_files=False)  # restoring needs no secret files
    except ConfigError as err:
        print(err.report(), file=sys.stderr)
        return 2
    # A restore under a live daemon would fight it (and delete the record it relies on).
    lock = claim("restore", cfg.state.dir)
    if lock is None:
        return 2
    with lock:
        return _restore(cfg)


def _restore(cfg: PalsdConfig) -> int:
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

    async def restore() -> None:
        try:
            ports: dict[str, Any] = dict(make_batch_ports(cfg))
        except OSError as err:  # e.g. an unreadable admin token: still put the GPUs back
            log.error("batch_restore_unavailable", error=str(err))
            ports = {}
        try:
            actuator = PowerActuator(backend, store, Metrics(), log, dry_run=False)
            await put_back(originals, store, actuator, ports, log)
        finally:
            for port in ports.values():
                port.close()

    try:
        asyncio.run(restore())
    except GpuError as err:
        print(f"palsd restore: {err}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    if originals.empty():
        log.info("restored", path=str(store.path))
        return 0
    print(
        f"palsd restore: some limits could not be restored: {originals.to_json()}",
        file=sys.stderr,
    )
    return 1
