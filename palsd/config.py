"""The configuration file: its schema, its defaults, and errors that name key, value and rule.

Validation happens once, at start (and on reload); everything after works on the frozen result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = Path("/etc/palsd/palsd.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControlConfig(_Section):
    period_s: float = Field(0.5, gt=0.01, le=60, description="control period, seconds")
    dry_run: bool = Field(False, description="read everything, log the limits, set nothing")
    controller: Literal["joint", "demand_split"] = "demand_split"
    max_raise_w_per_tick: float | None = Field(50.0, gt=0)


class GpuConfig(_Section):
    backend: Literal["nvml", "sim"] = "nvml"
    sim_url: str | None = Field(None, description="base URL of `palsd sim-host` (backend sim)")
    indices: list[int] | None = Field(None, description="GPU indices to control; None: all")
    timeout_s: float = Field(1.0, gt=0, le=30)

    @model_validator(mode="after")
    def _sim_needs_url(self) -> GpuConfig:
        if self.backend == "sim" and not self.sim_url:
            raise ValueError("gpu.sim_url is required when gpu.backend is 'sim'")
        return self


class BudgetConfig(_Section):
    default_w: float | None = Field(None, gt=0, le=1_000_000, description="host budget, W")
    fallback_w: float | None = Field(
        None, gt=0, le=1_000_000, description="budget used while the facility feed is silent"
    )
    max_override_ttl_s: float | None = Field(None, gt=0)


class SloConfig(_Section):
    ttft_s: float | None = Field(None, gt=0)
    ttft_quantile: float = 0.9
    itl_s: float | None = Field(None, gt=0)
    itl_quantile: float = 0.9
    min_generation_tokens_per_s: float | None = Field(None, ge=0)

    @field_validator("ttft_quantile", "itl_quantile")
    @classmethod
    def _known_quantile(cls, value: float) -> float:
        if value not in (0.5, 0.9, 0.99):
            raise ValueError("allowed quantiles are 0.5, 0.9 and 0.99")
        return value


class ServerConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(pattern=r"^https?://")
    gpus: list[int] = Field(min_length=1)
    slo: SloConfig = SloConfig()
    admin_token_file: Path | None = None
    min_batch_limit: int = Field(1, ge=1)
    max_batch_limit: int | None = Field(None, ge=1)


class ScrapeConfig(_Section):
    timeout_s: float = Field(1.0, gt=0, le=30)
    window_s: float = Field(10.0, gt=0, le=600)


class TcpApiConfig(_Section):
    enabled: bool = False
    host: Literal["127.0.0.1", "::1", "localhost"] = "127.0.0.1"
    port: int = Field(9102, ge=0, le=65535)
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_required(self) -> TcpApiConfig:
        if self.enabled and self.token_file is None:
            raise ValueError("api.tcp.token_file is required when api.tcp.enabled is true")
        return self


class ApiConfig(_Section):
    socket: Path = Path("/run/palsd/palsd.sock")
    admin_group: str | None = Field("palsd", description="group whose members may change")
    tcp: TcpApiConfig = TcpApiConfig()


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9101, ge=0, le=65535)


class StateConfig(_Section):
    dir: Path = Path("/var/lib/palsd")


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class MqttGroupConfig(_Section):
    topic: str = Field(min_length=1, description="group budget topic, under the prefix")
    share: float = Field(gt=0, le=1, description="this host's share of the group budget")


class MqttConfig(_Section):
    enabled: bool = False
    url: str = Field("mqtt://127.0.0.1:1883", pattern=r"^mqtts?://")
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = Field("palsd", min_length=1)
    host_id: str | None = Field(None, description="this host's name in topics; default hostname")
    groups: list[MqttGroupConfig] = []
    hmac_key_file: Path | None = None
    require_signature: bool = False
    max_budget_w: float = Field(100_000.0, gt=0, description="larger budgets are rejected")
    max_ttl_s: float = Field(86_400.0, gt=0)
    max_clock_skew_s: float = Field(30.0, ge=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    status_interval_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _signature_needs_key(self) -> MqttConfig:
        if self.require_signature and self.hmac_key_file is None:
            raise ValueError("mqtt.hmac_key_file is required when mqtt.require_signature is true")
        return self


class PalsdConfig(_Section):
    control: ControlConfig = ControlConfig()
    gpu: GpuConfig = GpuConfig()
    budget: BudgetConfig = BudgetConfig()
    servers: list[ServerConfig] = []
    scrape: ScrapeConfig = ScrapeConfig()
    api: ApiConfig = ApiConfig()
    metrics: MetricsConfig = MetricsConfig()
    state: StateConfig = StateConfig()
    logging: LoggingConfig = LoggingConfig()
    mqtt: MqttConfig = MqttConfig()

    @model_validator(mode="after")
    def _servers_consistent(self) -> PalsdConfig:
        names = [s.name for s in self.servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"servers: names must be unique, repeated: {dupes}")
        owner: dict[int, str] = {}
        for s in self.servers:
            for g in s.gpus:
                if g in owner:
                    raise ValueError(
                        f"servers: GPU {g} is listed by both {owner[g]!r} and {s.name!r}"
                    )
                owner[g] = s.name
        if (
            self.budget.fallback_w is not None
            and self.budget.default_w is not None
            and self.budget.fallback_w > self.budget.default_w
        ):
            raise ValueError("budget.fallback_w must not exceed budget.default_w")
        return self


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` lists one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        """What every command prints: the file, the count, then one problem per line."""
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        return "\n".join(lines + [f"  {p}" for p in self.problems])


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def describe_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-after"))
        key = _loc(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {e['input']!r}); check the spelling")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: value {e['input']!r} is not allowed: {msg}")
    return lines


def parse_config(data: Any, source: str = "<config>") -> PalsdConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return PalsdConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, describe_errors(err)) from None


def load_config(path: Path) -> PalsdConfig:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read the file: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    return parse_config(data, str(path))
