"""process_start_time_seconds read off a page without a regex (how a restart is seen)."""

from __future__ import annotations

from pathlib import Path

import pytest

from palsd.sense.vllm_metrics import process_start_s

FIXTURE = Path(__file__).parent / "data" / "vllm-0.32.0-cpu-metrics.txt"


@pytest.mark.parametrize(
    ("page", "want"),
    [
        (FIXTURE.read_text(), 1.7960236739e9),  # the real vLLM 0.32 page
        ("process_start_time_seconds 5\n", 5.0),  # first line, no newline before it
        ('a 1\nprocess_start_time_seconds{x="a b"} 7 123\n', 7.0),  # labels, a timestamp
        ("process_start_time_seconds_other 5\n", None),  # a longer name
        ("# HELP process_start_time_seconds Start time\n", None),  # a comment is not a sample
        ("x 1\n", None),
        ("process_start_time_seconds bad", None),
    ],
)
def test_process_start(page: str, want: float | None) -> None:
    assert process_start_s(page) == want
