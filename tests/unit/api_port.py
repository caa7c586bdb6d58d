"""An in-memory implementation of the API's port (palsd.runtime.control.DaemonControl) over the
real budget book, safety rules and power actuator, and a log that keeps its lines: what the API
tests and the API fuzz tests drive, without the daemon's loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palsd.act.originals import OriginalsStore
from palsd.act.power import PowerActuator
from palsd.core.budget import BudgetBook, BudgetEntry
from palsd.core.safety import fit_to_budget, order_writes
from palsd.core.types import BudgetInForce
from palsd.report.metrics import Metrics
from tests.unit.test_daemon import MemoryHost


class ListLog:
    """A structlog-shaped logger that records (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._add("exception", event, **fields)


class MemoryPort:
    """A budget change is enforced at once, the way the daemon enforces a cut on arrival."""

    def __init__(self, state_dir: Path, gpus: int = 4, now_s: float = 1000.0) -> None:
        self.host = MemoryHost(gpus)
        self.metrics = Metrics()
        self.log = ListLog()
        self.period_s = 0.5
        self.last_tick_at: float | None = now_s
        self.now_s = now_s
        self.actuator = PowerActuator(
            self.host, OriginalsStore(state_dir), self.metrics, self.log, dry_run=False
        )
        self.actuator.know(self.host.read_all())
        self.book = BudgetBook()
        self.changes = 0

    def now(self) -> float:
        return self.now_s

    def health(self) -> dict[str, Any]:
        problem = self.actuator.record_problem
        return {
            "ok": True,
            "last_tick_age_s": 0.0,
            "state_record_ok": problem is None,
            "state_record_problem": problem,
        }

    def status(self) -> dict[str, Any]:
        budget = self.book.in_force(self.now_s)
        return {
            "budget": {"effective_w": budget.effective_w, "source": budget.source.value},
            "state_record_problem": self.actuator.record_problem,
        }

    def set_override(self, entry: BudgetEntry | None) -> BudgetInForce:
        self.changes += 1
        self.book = self.book.with_override(entry)
        budget = self.book.in_force(self.now_s)
        gpus = self.host.read_all()
        current = {g.index: g.power_limit_w for g in gpus}
        fitted = fit_to_budget(current, gpus, budget.effective_w)
        self.actuator.apply(order_writes(current, fitted.limits_w))
        return budget

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "palsd_api_rejected_total", {"reason": reason}
        )
        return value or 0.0
