"""Fleet topic layout (pure): where allocations, host statuses and coordinator statuses live.

    <prefix>/<group>/budget                          the facility's group budget (in)
    <prefix>/<group>/alloc/<coordinator>/<host>/budget   one host's allocation, retained, signed
    <prefix>/<host>/status                           the host's status, retained (feed)
    <prefix>/<group>/coordinator/<coordinator>/status   the coordinator's status, retained
    <prefix>/<group>/coordinator/<coordinator>/state    online / offline (last will)

An allocation is an ordinary budget message, so the host's feed checks it like any other
(signature over topic and kind, expiry, sequence); the host subscribes to it as one more group
topic with share 1, and its budget book gives it the fleet role.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from palsd.core.budget import FleetGroup, FleetRole


def alloc_group(group: str, coordinator: str, host_id: str) -> str:
    """The allocation topic as a group topic under the prefix (what the feed subscribes to)."""
    return f"{group}/alloc/{coordinator}/{host_id}"


def budget_topic(prefix: str, group: str) -> str:
    return f"{prefix}/{group}/budget"


def alloc_topic(prefix: str, group: str, coordinator: str, host_id: str) -> str:
    return budget_topic(prefix, alloc_group(group, coordinator, host_id))


def host_status_topic(prefix: str, host_id: str) -> str:
    return f"{prefix}/{host_id}/status"


def coordinator_topic(prefix: str, group: str, coordinator: str, leaf: str) -> str:
    return f"{prefix}/{group}/coordinator/{coordinator}/{leaf}"


def feed_groups(groups: Iterable[Any], host_id: str) -> Iterator[tuple[str, float]]:
    """The (topic, share) pairs the host's feed subscribes to: each configured group, and for
    a coordinated one each coordinator's allocation topic for this host (share 1)."""
    for g in groups:
        yield g.topic, g.share
        for c in getattr(g, "coordinators", ()) or ():
            yield alloc_group(g.topic, c, host_id), 1.0


def fleet_roles(prefix: str, groups: Iterable[Any], host_id: str) -> dict[str, FleetRole]:
    """Full topic -> the fleet role of the entries that arrive on it."""
    prefix = prefix.rstrip("/")
    roles: dict[str, FleetRole] = {}
    for g in groups:
        coordinators = tuple(getattr(g, "coordinators", ()) or ())
        if not coordinators:
            continue
        origin = budget_topic(prefix, g.topic)
        group = FleetGroup(origin, g.share, coordinators, getattr(g, "hold_s", 5.0))
        roles[origin] = FleetRole(group)
        for c in coordinators:
            roles[alloc_topic(prefix, g.topic, c, host_id)] = FleetRole(group, c)
    return roles
