"""Every example config under deploy/examples passes the same validation palsd runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from palsd.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path):
    load_config(path)


def test_there_are_examples():
    assert len(EXAMPLES) >= 2
