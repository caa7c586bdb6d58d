"""Topic layout and reconnect backoff: pure value objects."""

from __future__ import annotations

import pytest

from palsd.feed.backoff import backoff_s
from palsd.feed.topics import FeedTopics, Kind, Route, TopicError


def test_layout_under_the_prefix() -> None:
    t = FeedTopics.build("dc1/palsd/", "gpu-07", [("row3/rack12", 0.125), ("site", 0.01)])
    assert t.host_budget == "dc1/palsd/gpu-07/budget"
    assert t.group_budget("row3/rack12") == "dc1/palsd/row3/rack12/budget"
    assert t.price == "dc1/palsd/price"
    assert t.status == "dc1/palsd/gpu-07/status"
    assert t.state == "dc1/palsd/gpu-07/state"
    assert t.subscriptions() == [
        "dc1/palsd/gpu-07/budget",
        "dc1/palsd/row3/rack12/budget",
        "dc1/palsd/site/budget",
        "dc1/palsd/price",
    ]


def test_routes_carry_kind_origin_and_share() -> None:
    t = FeedTopics.build("p", "h", [("rack", 0.25)])
    assert t.route("p/h/budget") == Route(Kind.BUDGET, "p/h/budget", 1.0)
    assert t.route("p/rack/budget") == Route(Kind.BUDGET, "p/rack/budget", 0.25)
    assert t.route("p/price") == Route(Kind.PRICE, "p/price", 1.0)
    assert t.route("p/other/budget") is None
    assert t.route("p/h/status") is None


@pytest.mark.parametrize(
    ("prefix", "host", "groups"),
    [
        ("p/+", "h", []),
        ("p", "h#", []),
        ("p", "", []),
        ("p", "a/b", []),
        ("p//q", "h", []),
        ("p", "h", [("rack/", 0.5)]),
        ("p", "h", [("h", 0.5)]),
        ("p", "h", [("rack", 0.5), ("rack", 0.5)]),
        ("p", "h", [("rack", 0.0)]),
        ("p", "h", [("rack", 1.5)]),
    ],
)
def test_bad_topic_parts_refused(prefix: str, host: str, groups: list[tuple[str, float]]) -> None:
    with pytest.raises(TopicError):
        FeedTopics.build(prefix, host, groups)


def test_backoff_grows_to_the_ceiling_and_stays_above_the_floor() -> None:
    assert backoff_s(0, 0.5, 30, 0.0) == 0.5
    assert backoff_s(0, 0.5, 30, 0.999) == 0.5  # the first retry waits the floor
    assert backoff_s(3, 0.5, 30, 1.0) == 4.0
    assert backoff_s(100, 0.5, 30, 1.0) == 30.0
    for attempt in range(50):
        for draw in (0.0, 0.3, 0.99):
            assert 0.5 <= backoff_s(attempt, 0.5, 30, draw) <= 30.0
