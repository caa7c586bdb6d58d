"""MQTT topic layout of the facility feed: pure value objects, no I/O.

Layout (every topic under the configured prefix):
    <prefix>/<host_id>/budget        this host's own budget (subscribed)
    <prefix>/<group>/budget          a group budget (rack, row, site), scaled by this host's share
    <prefix>/price                   the electricity price, one topic for every host (subscribed)
    <prefix>/<host_id>/status        palsd's status JSON, retained (published)
    <prefix>/<host_id>/state         "online" / "offline", retained, "offline" is the last will
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cached_property


class TopicError(ValueError):
    """A topic part that would break the layout (wildcards, empty levels, collisions)."""


class Kind(Enum):
    BUDGET = "budget"
    PRICE = "price"


def _check_part(name: str, value: str) -> str:
    # Wildcards or empty levels in a configured name would subscribe to more than intended.
    if not value or any(c in value for c in "+#\0"):
        raise TopicError(f"{name} {value!r}: must be non-empty without '+', '#' or NUL")
    if any(level == "" for level in value.split("/")):
        raise TopicError(f"{name} {value!r}: has an empty level (leading, trailing or '//')")
    return value


@dataclass(frozen=True)
class Route:
    """Where an incoming message came from and what it means for this host."""

    kind: Kind
    origin: str  # the full topic; the budget book keys facility entries by it
    share: float = 1.0  # fraction of a group budget that is this host's


@dataclass(frozen=True)
class FeedTopics:
    prefix: str
    host_id: str
    groups: tuple[tuple[str, float], ...] = ()  # (group topic under the prefix, share)

    def __post_init__(self) -> None:
        _check_part("topic_prefix", self.prefix)
        _check_part("host_id", self.host_id)
        if "/" in self.host_id:
            raise TopicError(f"host_id {self.host_id!r}: must be a single topic level")
        seen = {self.host_id}
        for topic, share in self.groups:
            _check_part("group topic", topic)
            if topic in seen:
                raise TopicError(f"group topic {topic!r}: repeats the host id or another group")
            if not 0 < share <= 1:
                raise TopicError(f"group topic {topic!r}: share {share} is not in (0, 1]")
            seen.add(topic)

    @classmethod
    def build(cls, prefix: str, host_id: str, groups: Iterable[tuple[str, float]]) -> FeedTopics:
        return cls(prefix.rstrip("/"), host_id, tuple(groups))

    @property
    def host_budget(self) -> str:
        return f"{self.prefix}/{self.host_id}/budget"

    def group_budget(self, group: str) -> str:
        return f"{self.prefix}/{group}/budget"

    @property
    def price(self) -> str:
        return f"{self.prefix}/price"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.host_id}/status"

    @property
    def state(self) -> str:
        return f"{self.prefix}/{self.host_id}/state"

    def routes(self) -> dict[str, Route]:
        table = {self.host_budget: Route(Kind.BUDGET, self.host_budget)}
        for group, share in self.groups:
            topic = self.group_budget(group)
            table[topic] = Route(Kind.BUDGET, topic, share)
        table[self.price] = Route(Kind.PRICE, self.price)
        return table

    def subscriptions(self) -> list[str]:
        return list(self.routes())

    @cached_property
    def _route_table(self) -> dict[str, Route]:
        return self.routes()  # built once: route() runs for every message

    def route(self, topic: str) -> Route | None:
        return self._route_table.get(topic)
