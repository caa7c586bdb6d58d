"""Scraping one vLLM server's /metrics over HTTP into windowed signals; never raises.

The imperative shell around vllm_metrics (parse) and signals (window): one VllmScraper per
configured server, polled by its scrape task with the time of the scrape. Each keeps its own
kept-alive connection to its server (palsd.sense.http_get): the scrape is the daemon's hottest
path, and httpx's per-request cost was most of the daemon's CPU.
"""

from __future__ import annotations

from palsd.core.types import ServerSignals
from palsd.errors import BadInput
from palsd.sense.http_get import HttpGetError, HttpGetTimeout, PageGetter
from palsd.sense.signals import DEFAULT_WINDOW_S, SignalWindow, WindowReport
from palsd.sense.vllm_metrics import EngineKey, EngineSample, parse_metrics, process_start_s


def metrics_url(url: str) -> str:
    """A server's base URL or its /metrics URL -> the /metrics URL."""
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


class VllmScraper:
    """Scrapes one server; `poll` answers its signals or None when they are stale.

    On None, `stale_reason` says why (for logs, status and the controller) and `failures`
    counts every failed scrape since start; `consecutive_failures` resets on success.
    `reconnects` counts scrapes sent twice because the server dropped an idle connection.
    `restarts` counts restarts of the server seen on its page (a new process start time, or
    a counter that went back): whoever acts on the server (its batch limit) reads it.
    """

    def __init__(
        self,
        url: str,
        window_s: float = DEFAULT_WINDOW_S,
        timeout_s: float = 1.0,
    ) -> None:
        self.url = metrics_url(url)
        self._getter = PageGetter(self.url)
        self._timeout_s = timeout_s
        self._window = SignalWindow(window_s)
        self.stale_reason: str | None = "not scraped yet"
        self.failures = 0
        self.consecutive_failures = 0
        self.restarts = 0
        self.last_report: WindowReport | None = None
        self._started_s: float | None = None  # the server's process_start_time_seconds
        self._engines: dict[EngineKey, EngineSample] = {}  # the last page's, for resets

    @property
    def reconnects(self) -> int:
        """Scrapes repeated on a fresh connection after the server dropped a kept-alive one."""
        return self._getter.reconnects

    async def poll(self, now_s: float) -> ServerSignals | None:
        """Scrape once, add it to the window taken at `now_s`, answer the server's signals."""
        reason = await self._scrape(now_s)
        if reason is not None:
            self.failures += 1
            self.consecutive_failures += 1
            self.stale_reason = reason
            return None
        self.consecutive_failures = 0
        self.stale_reason = None
        self.last_report = self._window.report()
        return None if self.last_report is None else self.last_report.server

    def close(self) -> None:
        """Close the kept-alive connection (a later poll opens a new one)."""
        self._getter.close()

    async def _scrape(self, now_s: float) -> str | None:
        """None on success, else the reason the scrape failed."""
        try:
            page = await self._getter.get(self._timeout_s)
        except HttpGetTimeout:
            return f"timeout after {self._timeout_s:g} s scraping {self.url}"
        except HttpGetError as e:
            return f"cannot reach {self.url}: {e}"
        if page.status != 200:
            return f"{self.url} answered HTTP {page.status}"
        text = page.text
        try:
            # On the loop: a parse takes well under a millisecond (only the families palsd
            # reads), less than handing it to a thread and back, and a thread would hold the
            # GIL throughout anyway (the regex engine does not release it).
            engines = parse_metrics(text)
        except BadInput as e:
            return f"{self.url}: {e}"
        except Exception as e:  # a parser bug must not take the daemon down with it
            return f"{self.url}: cannot parse metrics: {type(e).__name__}: {e}"
        started_s = process_start_s(text)
        if self._restarted(started_s, engines):
            self.restarts += 1
        self._started_s = started_s if started_s is not None else self._started_s
        self._engines = engines
        self._window = self._window.push(now_s, engines)
        return None

    def _restarted(self, started_s: float | None, engines: dict[EngineKey, EngineSample]) -> bool:
        """A new process since the last good scrape: its start time moved, or a counter that
        only grows in one process went back (a server without the process collector)."""
        if started_s is not None and self._started_s is not None:
            return started_s != self._started_s
        for key, new in engines.items():
            old = self._engines.get(key)
            if old is None:
                continue
            for a, b in (
                (old.generation_tokens, new.generation_tokens),
                (old.prompt_tokens, new.prompt_tokens),
                (old.requests_finished, new.requests_finished),
            ):
                if a is not None and b is not None and b < a:
                    return True
        return False
