"""structlog set-up: JSON lines when not on a terminal (journald, files), readable otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str = "palsd") -> Any:
    return structlog.get_logger(name)


class LogLimiter:
    """At most `burst` log lines per key (a rejection reason) per `window_s`, and how many
    were left out: whoever logs on a client's or a publisher's fault uses one, so a hostile
    flood is counted in metrics but cannot flood the journal."""

    def __init__(self, burst: int, window_s: float) -> None:
        self.burst, self.window_s = burst, window_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # start, logged, suppressed

    def allow(self, key: str, now_s: float) -> int | None:
        """None: leave this one out. Otherwise log it, with this many left out before it."""
        start, logged, suppressed = self._windows.get(key, (now_s, 0, 0))
        if now_s - start >= self.window_s:
            start, logged = now_s, 0
        if logged >= self.burst:
            self._windows[key] = (start, logged, suppressed + 1)
            return None
        self._windows[key] = (start, logged + 1, 0)
        return suppressed
