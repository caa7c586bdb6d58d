"""`palsd run`: start the daemon, serve the API and metrics, restore every limit on the way out.

Signal handlers only set events; all hardware work happens in the daemon's tasks, and the
daemon (an async context manager owning one TaskGroup) stops them all before it restores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from palsd import __version__
from palsd.act.originals import Originals, OriginalsStore
from palsd.act.power import PowerActuator
from palsd.act.restore import put_back
from palsd.api.server import ApiServer
from palsd.config import (
    DEFAULT_CONFIG_PATH,
    RELOADABLE_KEYS,
    ConfigError,
    PalsdConfig,
    changed_keys,
    load_config,
    with_reloaded,
)
from palsd.core.budget import BudgetBook
from palsd.core.types import GpuObservation
from palsd.errors import GpuError
from palsd.report.logs import configure_logging, get_logger
from palsd.report.metrics import Metrics
from palsd.report.metrics_http import serve_metrics
from palsd.runtime.daemon import Daemon
from palsd.runtime.instance_lock import claim
from palsd.runtime.notify import Notifier
from palsd.runtime.wiring import (
    batch_ports,
    make_backend,
    make_controller,
    make_server_links,
    read_secret,
)


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
        cfg = _dry_run(cfg)
    # Before anything is touched: one instance per state dir, and no foreign file at api.socket.
    lock = claim("run", cfg.state.dir, cfg.api.socket)
    if lock is None:
        return 2
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        return asyncio.run(serve(cfg, args.config, forced_dry_run=args.dry_run))
    except KeyboardInterrupt:
        return 0
    finally:
        lock.release()


async def reconcile(
    store: OriginalsStore,
    actuator: PowerActuator,
    ports: dict[str, Any],
    gpus: Sequence[GpuObservation],
    log: Any,
) -> None:
    """Take over what a previous run left behind (it crashed or was killed).

    What this run controls too (the same GPU, by index and UUID; a configured server) is
    adopted: the recorded originals stay the originals, the limits stay where the last run put
    them, under its budget, and this run's first tick fits them to the budget now in force.
    Putting them back first would lift every GPU to its original limit, above the budget,
    until that tick. Whatever this run does not control is put back at once."""
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
    present = {g.index: g.uuid for g in gpus}
    foreign = Originals()
    gone: dict[int, dict[str, Any]] = {}
    for index, entry in list(previous.gpus.items()):
        uuid = entry.get("uuid", "")
        if index in present and uuid in ("", present[index]):
            continue  # this run's GPU: adopted
        if uuid and uuid not in present.values() and index in present:
            # Its card is not on the host and another holds its index: that card's limit is
            # not this one, and the entry would keep this run from recording the new card's
            # original (which it then could not put back). Nothing to write; dropped.
            gone[index] = previous.gpus.pop(index)
        else:
            foreign.gpus[index] = entry  # back at once (where its card is now), or kept
    if gone:
        with contextlib.suppress(OSError):  # else the first save of this run's record drops it
            store.save(previous)
        log.warning(
            "recorded_gpu_not_found",
            gpus={i: {"uuid": e.get("uuid"), "limit_w": e.get("limit_w")} for i, e in gone.items()},
            action="dropped from the record: another card holds its index now, and a limit "
            "does not survive a driver reload (nvmlDeviceSetPowerManagementLimit)",
        )
    for name, entry in previous.servers.items():
        if name not in ports:
            foreign.servers[name] = entry
    restored: list[int] = []
    failed: dict[int, str] = {}
    if not foreign.empty():
        result = await put_back(previous, store, actuator, ports, log, only=foreign)
        restored, failed = sorted(result.applied), result.failed
    actuator.adopt(previous)  # what is left: this run's originals, restored at its exit
    log.warning(
        "reconciled_previous_run",
        adopted_gpus=sorted(i for i in previous.gpus if i not in foreign.gpus),
        adopted_servers=sorted(n for n in previous.servers if n not in foreign.servers),
        restored_gpus=restored,
        failed=failed,
    )


def _dry_run(cfg: PalsdConfig) -> PalsdConfig:
    return cfg.model_copy(update={"control": cfg.control.model_copy(update={"dry_run": True})})


async def serve(cfg: PalsdConfig, config_path: Path, forced_dry_run: bool = False) -> int:
    log = get_logger()
    metrics = Metrics()
    metrics.info.info(
        {"version": __version__, "backend": cfg.gpu.backend, "controller": cfg.control.controller}
    )
    metrics.dry_run.set(1 if cfg.control.dry_run else 0)
    backend = make_backend(cfg)
    try:
        gpus = await asyncio.to_thread(backend.read_all)
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

    with batch_ports(cfg) as ports:
        if not cfg.control.dry_run:
            await reconcile(store, actuator, ports, gpus, log)

        async def restore() -> None:
            if not actuator.dry_run:
                result = await put_back(actuator.originals, store, actuator, ports, log)
                log.info("limits_restored", gpus=sorted(result.applied), failed=result.failed)

        daemon = Daemon(
            backend=backend,
            actuator=actuator,
            controller=make_controller(cfg),
            servers=make_server_links(
                cfg, ports, metrics=metrics, log=log, record_original=actuator.record_server
            ),
            book=BudgetBook(
                cfg.budget.default_w, cfg.budget.fallback_w, facility_expected=cfg.mqtt.enabled
            ),
            metrics=metrics,
            log=log,
            period_s=cfg.control.period_s,
            notifier=Notifier(),
            restore=restore,
        )
        api = ApiServer(
            daemon,
            cfg.api.socket,
            cfg.api.admin_group,
            tcp=(cfg.api.tcp.host, cfg.api.tcp.port) if cfg.api.tcp.enabled else None,
            token=read_secret(cfg.api.tcp.token_file),
            max_override_ttl_s=cfg.budget.max_override_ttl_s,
        )
        # Bound before the first write: a socket or port that cannot be had stops palsd here.
        await api.start()
        if api.tcp_port is not None:
            log.info("api_tcp_listening", host=cfg.api.tcp.host, port=api.tcp_port)
        try:
            exporter = (
                await serve_metrics(metrics.registry, cfg.metrics.host, cfg.metrics.port, log)
                if cfg.metrics.enabled
                else None
            )
        except BaseException:
            await api.stop()
            raise
        log.info(
            "palsd_started",
            version=__version__,
            backend=backend.name,
            dry_run=cfg.control.dry_run,
            controller=daemon.controller.name,
            socket=str(cfg.api.socket),
            servers=[s.name for s in cfg.servers],
            period_s=cfg.control.period_s,
        )
        try:
            async with daemon:
                daemon.spawn("api", _serve_until_cancelled(api.stop))
                if exporter is not None:
                    daemon.spawn("metrics-http", _serve_until_cancelled(exporter.cleanup))
                daemon.spawn(
                    "reloader",
                    _reloader(
                        reload_requested, config_path, cfg, daemon, metrics, log, forced_dry_run
                    ),
                )
                if cfg.mqtt.enabled:
                    daemon.spawn("mqtt-feed", _feed(cfg, daemon, metrics).run())
                await stop.wait()
        except Exception as err:  # a task failed: every other one was stopped, limits restored
            log.error("palsd_failed", error=repr(err), action="stopped; limits restored")
            return 1
        finally:
            backend.close()
    log.info("palsd_stopped")
    return 0


async def _serve_until_cancelled(stop: Callable[[], Awaitable[None]]) -> None:
    """A server started before the TaskGroup, owned by it: cancelled, it stops."""
    try:
        await asyncio.Event().wait()
    finally:
        await stop()


def _feed(cfg: PalsdConfig, daemon: Daemon, metrics: Metrics) -> Any:
    from palsd.feed.mqtt import MqttFeed

    feed = MqttFeed(
        cfg.mqtt,
        daemon.budgets,
        daemon.status,
        metrics.registry,
        seq_path=cfg.state.dir / "mqtt-seq.json",
    )
    daemon.status_extra["feed"] = feed.state
    return feed


async def _reloader(
    requested: asyncio.Event,
    path: Path,
    running: PalsdConfig,
    daemon: Daemon,
    metrics: Metrics,
    log: Any,
    forced_dry_run: bool = False,
) -> None:
    while True:
        await requested.wait()
        requested.clear()
        try:
            new = load_config(path)
            if forced_dry_run:  # `palsd run --dry-run` holds whatever the file says
                new = _dry_run(new)
        except ConfigError as err:
            metrics.config_reloads.labels("rejected").inc()
            log.error(
                "config_reload_rejected",
                problems=err.problems,
                action="the running configuration stays in force",
            )
            continue
        changed = changed_keys(running, new)
        daemon.budgets.replace_config(new.budget.default_w, new.budget.fallback_w)
        daemon.set_period(new.control.period_s)
        metrics.config_reloads.labels("applied").inc()
        # `running` stays what is in force, so a key that waits for a restart is named again
        # by every reload until then.
        log.info(
            "config_reloaded",
            applied=[k for k in changed if k in RELOADABLE_KEYS],
            needs_restart=[k for k in changed if k not in RELOADABLE_KEYS],
        )
        running = with_reloaded(running, new)
