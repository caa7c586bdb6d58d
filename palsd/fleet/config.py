"""The coordinator's configuration file: one group, its members, the broker. Validated at start
with the same error rendering as palsd's own config (key, value, what is allowed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from palsd.config import ConfigError, describe_errors
from palsd.feed.topics import FeedTopics, TopicError

DEFAULT_COORDINATOR_CONFIG = Path("/etc/palsd/coordinator.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_level(name: str, value: str) -> str:
    if not value or any(c in value for c in "/+#\0") or value != value.strip():
        raise ValueError(f"{name} {value!r} must be one topic level (no '/', '+', '#')")
    return value


class MemberConfig(_Section):
    host_id: str = Field(min_length=1, description="the host's mqtt.host_id")
    share: float = Field(gt=0, le=1, description="its fixed share (its fallback), of the group")

    @field_validator("host_id")
    @classmethod
    def _host(cls, value: str) -> str:
        return _one_level("host_id", value)


class CoordinatorMqttConfig(_Section):
    url: str = Field("mqtt://127.0.0.1:1883", pattern=r"^mqtts?://")
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = Field("palsd", min_length=1)
    hmac_key_file: Path | None = Field(None, description="signs allocations, checks budgets")
    require_signature: bool = False
    max_budget_w: float = Field(10_000_000.0, gt=0, description="larger group budgets: rejected")
    max_ttl_s: float = Field(86_400.0, gt=0)
    max_clock_skew_s: float = Field(30.0, ge=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _signature_needs_key(self) -> CoordinatorMqttConfig:
        if self.require_signature and self.hmac_key_file is None:
            raise ValueError("mqtt.hmac_key_file is required when mqtt.require_signature is true")
        return self


class AllocationConfig(_Section):
    ttl_s: float = Field(15.0, gt=0, le=3600, description="allocation lifetime")
    refresh_s: float = Field(3.0, gt=0, description="re-send an unchanged allocation after")
    round_s: float = Field(0.5, gt=0, le=60, description="a round at least this often")
    stale_after_s: float = Field(15.0, gt=0, description="a member's status older: stale")
    min_change_w: float = Field(1.0, ge=0, description="smaller raises are not sent")
    peers: bool = Field(False, description="another coordinator allocates this group too")
    host_hold_s: float = Field(
        5.0, gt=0, le=3600, description="the hosts' mqtt.groups[].hold_s (at least)"
    )

    @model_validator(mode="after")
    def _refresh_before_expiry(self) -> AllocationConfig:
        if self.refresh_s >= self.ttl_s / 2:
            raise ValueError("allocation.refresh_s must be under half of allocation.ttl_s")
        return self


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9103, ge=0, le=65535)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class CoordinatorConfig(_Section):
    coordinator_id: str = Field(min_length=1, description="this coordinator's id (one level)")
    group: str = Field(min_length=1, description="the group topic under the prefix")
    members: list[MemberConfig] = Field(min_length=1)
    mqtt: CoordinatorMqttConfig = CoordinatorMqttConfig()
    allocation: AllocationConfig = AllocationConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("coordinator_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _one_level("coordinator_id", value)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        try:
            FeedTopics.build("palsd", "this-host", [(value, 1.0)])
        except TopicError as err:
            raise ValueError(str(err).split(": ", 1)[-1]) from None
        return value

    @model_validator(mode="after")
    def _members(self) -> CoordinatorConfig:
        ids = [m.host_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError("members: host ids must be unique")
        total = sum(m.share for m in self.members)
        if total > 1.0 + 1e-9:
            # The fallback's safety rests on the shares summing to at most the group.
            raise ValueError(f"members: shares sum to {total:.6f}, more than 1")
        return self


def parse_coordinator_config(data: Any, source: str = "<config>") -> CoordinatorConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping"])
    try:
        return CoordinatorConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, describe_errors(err)) from None


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read the file: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    return parse_coordinator_config(data, str(path))
