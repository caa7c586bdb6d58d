"""Putting recorded limits back: at exit, at start after a crash, and by `palsd restore`.

One routine for all three, so a limit comes back the same way whoever asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from palsd.act.originals import Originals, OriginalsStore
from palsd.act.power import PowerActuator, WriteResult


async def put_back(
    originals: Originals,
    store: OriginalsStore,
    actuator: PowerActuator,
    batch_ports: Mapping[str, Any],
    log: Any,
    only: Originals | None = None,
) -> WriteResult:
    """Restore every GPU limit and batch limit in `originals` (or only those also in `only`),
    drop what went back from it, and save what is left (or remove the record when nothing
    is): the record on disk always holds everything not yet back. GPU limits go through the
    actuator (the one choke point that clamps and counts every write). Never raises for one
    failed write: it is logged, kept in the record, and the rest still go back.

    Nor for a record it cannot update (read-only or full state directory): what went back is
    back, so that is a warning naming the file. The file left holds the old record, a superset
    of what is not back, and a later restore from it puts the same originals back again."""
    chosen = originals if only is None else only
    targets = {i: float(e["limit_w"]) for i, e in originals.gpus.items() if i in chosen.gpus}
    uuids = {i: str(e.get("uuid", "")) for i, e in originals.gpus.items()}
    result = await asyncio.to_thread(actuator.restore, targets, uuids)
    for index in result.applied:
        originals.gpus.pop(index, None)
    for name, entry in list(originals.servers.items()):
        port = batch_ports.get(name)
        if port is None or name not in chosen.servers:
            continue
        try:
            await port.set(int(entry["batch_limit"]))
        except Exception as err:  # any failure: keep it recorded for the next attempt
            log.error("batch_limit_restore_failed", server=name, error=str(err))
            continue
        originals.servers.pop(name)
        log.info("batch_limit_restored", server=name, limit=entry["batch_limit"])
    try:
        if originals.empty():
            store.clear()
        else:
            store.save(originals)
    except OSError as err:
        log.warning(
            "originals_record_left",
            path=str(store.path),
            error=err.strerror or str(err),
            not_restored={"gpus": sorted(originals.gpus), "servers": sorted(originals.servers)},
            action="the limits restored are back; remove the file once the state directory "
            "is writable (or run `palsd restore` again then: it puts the same originals back)",
        )
    return result
