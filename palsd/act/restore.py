"""Putting recorded limits back: at exit, at start after a crash, and by `palsd restore`.

One routine for all three, so a limit comes back the same way whoever asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from palsd.act.originals import Originals, OriginalsStore
from palsd.act.power import WriteResult
from palsd.errors import GpuError
from palsd.sense.gpu import GpuBackend


async def put_back(
    originals: Originals,
    store: OriginalsStore,
    backend: GpuBackend,
    batch_ports: Mapping[str, Any],
    log: Any,
) -> WriteResult:
    """Restore every GPU limit and batch limit in `originals`, drop what went back from it,
    and save what is left (or remove the record when nothing is). Never raises for one
    failed write: it is logged, kept in the record, and the rest still go back."""
    targets = {i: float(e["limit_w"]) for i, e in originals.gpus.items()}
    result = await asyncio.to_thread(restore_gpus, backend, targets, log)
    for index in result.applied:
        originals.gpus.pop(index, None)
    for name, entry in list(originals.servers.items()):
        port = batch_ports.get(name)
        if port is None:
            continue
        try:
            await port.set(int(entry["batch_limit"]))
        except Exception as err:  # any failure: keep it recorded for the next attempt
            log.error("batch_limit_restore_failed", server=name, error=str(err))
            continue
        originals.servers.pop(name)
        log.info("batch_limit_restored", server=name, limit=entry["batch_limit"])
    if originals.empty():
        store.clear()
    else:
        store.save(originals)
    return result


def restore_gpus(backend: GpuBackend, targets_w: dict[int, float], log: Any) -> WriteResult:
    """Write recorded limits back. Used at exit, by `palsd restore` and at start-up."""
    applied: dict[int, float] = {}
    failed: dict[int, str] = {}
    try:
        current = {g.index: g.power_limit_w for g in backend.read_all()}
    except GpuError:
        current = {}
    # Lower first: restoring a mix of raised and lowered limits never overshoots in between.
    order = sorted(targets_w.items(), key=lambda kv: kv[1] - current.get(kv[0], kv[1]))
    for index, watts in order:
        if abs(current.get(index, float("nan")) - watts) <= 0.5:
            applied[index] = watts
            continue
        try:
            backend.set_power_limit_w(index, watts)
        except GpuError as err:
            log.error("power_limit_restore_failed", gpu=index, limit_w=watts, error=str(err))
            failed[index] = str(err)
            continue
        log.info("power_limit_restored", gpu=index, limit_w=watts)
        applied[index] = watts
    return WriteResult(applied, failed)
