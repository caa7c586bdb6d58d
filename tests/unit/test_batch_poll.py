"""A server's batch limit is read on a slow poll while all is well (most of the daemon's HTTP
calls were these reads), and at once when the server's page shows it restarted: a restarted
vLLM holds its own limit again, and palsd puts its own back in the next tick."""

from __future__ import annotations

import asyncio
from pathlib import Path

from palsd.act.memory import MemoryBatchPort
from palsd.runtime.daemon import BATCH_POLL_S
from palsd.sense.memory import FixedSignals
from tests.unit.test_daemon import MemoryHost, make_daemon, until


async def test_reads_are_slow_until_the_page_shows_a_restart(tmp_path: Path) -> None:
    port, signals = MemoryBatchPort(), FixedSignals()
    daemon = make_daemon(tmp_path, MemoryHost(2), period_s=0.1, port=port, signals=signals)
    async with daemon:
        await until(lambda: port.gets >= 1 and daemon.last_tick_at is not None)
        await asyncio.sleep(1.0)  # ten ticks
        assert port.gets == 1 < BATCH_POLL_S / 0.1
        signals.restarts += 1  # what VllmScraper counts when process_start_time_seconds moves
        await until(lambda: port.gets == 2, timeout_s=1.0)  # long before the next poll
        await asyncio.sleep(0.5)
        assert port.gets == 2  # once per restart, not every tick
