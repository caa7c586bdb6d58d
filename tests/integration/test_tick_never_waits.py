"""A hung vLLM server (a real TCP server that accepts and never answers) does not stretch the
tick: the daemon, with palsd's real HTTP scraper and batch-limit client pointed at it, keeps its
period, says why the server is stale, and only completed ticks feed the watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from palsd.act.batch import BatchLimitClient
from palsd.act.batch_actuator import BatchActuator
from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.core.budget import BudgetBook
from palsd.core.controller import JointController
from palsd.core.types import Slo
from palsd.report.metrics import Metrics
from palsd.runtime.daemon import Daemon, ServerLink
from palsd.sense.memory import MemoryHost
from palsd.sense.scraper import ServerScraper
from palsd.sense.vllm import VllmScraper
from tests.unit.test_daemon import SentNotifier

PERIOD_S = 0.2
SCRAPE_TIMEOUT_S = 20.0  # far longer than the period, and than systemd's WatchdogSec


@pytest.fixture
async def hung_server() -> AsyncIterator[str]:
    """Accepts connections, reads what is sent, never writes a byte back."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):  # until the client gives up and closes
            pass

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_hung_server_does_not_stretch_the_tick(tmp_path: Path, hung_server: str) -> None:
    host = MemoryHost(2)
    metrics = Metrics()
    log = structlog.get_logger("test")
    actuator = PowerActuator(host, OriginalsStore(tmp_path), metrics, log, dry_run=False)
    notifier = SentNotifier()
    with contextlib.closing(BatchLimitClient(hung_server, None, SCRAPE_TIMEOUT_S)) as batch:
        link = ServerLink(
            "hung",
            hung_server,
            (0, 1),
            Slo(ttft_s=2.0, itl_s=0.1),
            ServerScraper(VllmScraper(hung_server, 10.0, SCRAPE_TIMEOUT_S), PERIOD_S),
            BatchActuator(
                "hung",
                hung_server,
                batch,
                log=log,
                metrics=metrics,
                record_original=actuator.record_server,
                dry_run=False,
                poll_s=PERIOD_S,
            ),
        )
        daemon = Daemon(
            backend=host,
            actuator=actuator,
            controller=JointController(),
            servers=[link],
            book=BudgetBook(default_w=1000),
            metrics=metrics,
            log=log,
            period_s=PERIOD_S,
            notifier=notifier,
        )
        ticks: list[float] = []
        async with daemon:
            started = time.monotonic()
            while time.monotonic() - started < 3.0:
                await asyncio.sleep(0.01)
                if daemon.last_tick_at is not None and (
                    not ticks or daemon.last_tick_at != ticks[-1]
                ):
                    ticks.append(daemon.last_tick_at)
            status = daemon.status()
    # Ticks kept coming at the period, none anywhere near the 20 s the scrape may take (a
    # busy machine may stretch one by some milliseconds: that is not what is tested here).
    total = metrics.registry.get_sample_value("palsd_tick_duration_seconds_count")
    within_1s = metrics.registry.get_sample_value(
        "palsd_tick_duration_seconds_bucket", {"le": "1.0"}
    )
    assert total and within_1s == total
    assert len(ticks) >= 3.0 / PERIOD_S * 0.6, ticks
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 1.0, gaps
    # The watchdog was fed by those ticks, READY first.
    assert notifier.sent[0][0] == "READY=1" and len(notifier.sent) >= len(ticks) - 1
    # The server is shown stale, with the reason; its batch limit unknown, never a cached wish.
    [server] = status["servers"]
    assert server["up"] is False
    assert server["stale_reason"].startswith(f"no answer from {hung_server}/metrics for ")
    assert server["batch_limit"] is None and server["batch_control"] == "unknown"
    assert host.limit_sum_w() <= 1000  # the budget was still obeyed
