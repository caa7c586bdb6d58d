from __future__ import annotations

import pytest

from palsd.units import mw_to_w, parse_duration_s, parse_watts, w_to_mw


@pytest.mark.parametrize(("text", "watts"), [("2400", 2400), ("2400W", 2400), ("2.4kW", 2400)])
def test_parse_watts(text, watts):
    assert parse_watts(text) == watts


@pytest.mark.parametrize("text", ["", "abc", "-5W", "nanW", "0W", "infW"])
def test_parse_watts_rejects(text):
    with pytest.raises(ValueError):
        parse_watts(text)


@pytest.mark.parametrize(("text", "s"), [("500ms", 0.5), ("10s", 10), ("10m", 600), ("2h", 7200)])
def test_parse_duration(text, s):
    assert parse_duration_s(text) == s


def test_mw_round_trip_rounds_down():
    assert w_to_mw(250.0009) == 250000
    assert mw_to_w(700000) == 700.0
