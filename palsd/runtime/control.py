"""The port the local API drives: what a caller may ask of the running daemon, and nothing else.

The API never reads the daemon's attributes; a test can serve the API over any small object
with these members.
"""

from __future__ import annotations

from typing import Any, Protocol

from palsd.core.budget import BudgetEntry
from palsd.core.types import BudgetInForce
from palsd.report.metrics import Metrics


class DaemonControl(Protocol):
    @property
    def metrics(self) -> Metrics: ...

    @property
    def log(self) -> Any: ...

    def now(self) -> float:
        """The daemon's clock (seconds), which budget expiries are measured on."""
        ...

    def status(self) -> dict[str, Any]:
        """The status model (report/status.py), JSON-able."""
        ...

    def health(self) -> dict[str, Any]:
        """{"ok", "last_tick_age_s", "state_record_ok", "state_record_problem"}: ok while the
        control loop completes ticks."""
        ...

    def set_override(self, entry: BudgetEntry | None) -> BudgetInForce:
        """Set (or clear, with None) the local budget override; answers the budget in force.
        A lower budget is enforced on arrival."""
        ...
