"""The coordinator's shell without a broker: config errors, and every message ends as one
counted outcome; a bad one changes nothing."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.config import ConfigError
from palsd.feed.payload import encode
from palsd.fleet.config import parse_coordinator_config
from palsd.fleet.service import CoordinatorService

BASE = {
    "coordinator_id": "c1",
    "group": "row1/rack1",
    "members": [{"host_id": "a", "share": 0.5}, {"host_id": "b", "share": 0.5}],
}


def service() -> CoordinatorService:
    return CoordinatorService(parse_coordinator_config(BASE))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"members": [{"host_id": "a", "share": 0.7}, {"host_id": "b", "share": 0.7}]}, "sum"),
        ({"members": [{"host_id": "a", "share": 0.5}, {"host_id": "a", "share": 0.5}]}, "unique"),
        ({"coordinator_id": "c/1"}, "one topic level"),
        ({"group": "row1/+"}, "group"),
        ({"allocation": {"ttl_s": 4, "refresh_s": 3}}, "refresh_s"),
        ({"members": []}, "members"),
        ({"colour": "blue"}, "unknown key"),
    ],
)
def test_bad_config_names_the_problem(change, problem):
    with pytest.raises(ConfigError) as err:
        parse_coordinator_config({**BASE, **change})
    assert problem in err.value.report()


def test_a_group_budget_and_a_status_are_accepted():
    svc = service()
    msg = {"budget_w": 3000, "seq": 1, "issued_at": time.time(), "ttl_s": 60, "sender": "fm"}
    svc.handle("palsd/row1/rack1/budget", encode(msg))
    assert svc.core.group_w == 3000
    status = {
        "fleet": {
            "floor_w": 400,
            "max_w": 1400,
            "demand_w": 900,
            "draw_w": 800,
            "urgency": 0.2,
            "groups": {"palsd/row1/rack1/budget": {"in_force_w": 0, "joining": True, "held": {}}},
        }
    }
    svc.handle("palsd/a/status", json.dumps(status).encode())
    report = svc.core.members["a"].report
    assert report is not None and report.demand_w == 900
    assert svc.rejected_total == 0


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from(["palsd/row1/rack1/budget", "palsd/a/status", "palsd/x/status"]),
    raw=st.binary(max_size=300)
    | st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=8), st.none())),
)
def test_any_bytes_end_as_one_counted_rejection_and_change_nothing(topic, raw):
    svc = service()
    before = (svc.core.group_w, {h: m.report for h, m in svc.core.members.items()})
    svc.handle(topic, raw)
    after = (svc.core.group_w, {h: m.report for h, m in svc.core.members.items()})
    assert after == before
    assert svc.rejected_total == 1
