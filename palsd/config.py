"""The configuration file: its schema, its defaults, and errors that name key, value and rule.

Validation happens once, at start (and on reload); everything after works on the frozen result.

The rules of this file:
- Every problem is found in one pass and reported as `key: value V is not allowed: RULE`; a
  config that `palsd check-config` accepts starts (`palsd run` and check-config share
  `load_config`, file checks included).
- Types are strict: `"yes"` is not a boolean, `true` is not a number, `"5"` is not a number;
  every number is finite and bounded.
- The file itself is checked before it is trusted: at most MAX_CONFIG_BYTES, UTF-8, one YAML
  document, no duplicate keys, and anchors/aliases bounded (MAX_ALIASES, MAX_EXPANDED_NODES,
  MAX_DEPTH) before anything is expanded, so an alias bomb is refused in milliseconds.
- Cross-key rules raise CrossKeyProblems, which carries one line per broken rule, so every
  cross-key problem is reported, not only the first.
- A leaf module: it imports only the pure topic rules of palsd.feed.topics.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from palsd.feed.topics import FeedTopics, TopicError

DEFAULT_CONFIG_PATH = Path("/etc/palsd/palsd.yaml")
MAX_CONFIG_BYTES = 64 * 1024
MAX_ALIASES = 100
MAX_EXPANDED_NODES = 20_000
MAX_DEPTH = 32
MAX_SECRET_BYTES = 64 * 1024
YEAR_S = 366 * 86_400

GpuIndex = Annotated[int, Field(ge=0, le=1023)]


class CrossKeyProblems(ValueError):
    """Several rules that span keys, each (key, value, rule); raised from a validator."""

    def __init__(self, problems: list[tuple[str, Any, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{k}: {r}" for k, _, r in problems))


def _raise_all(problems: list[tuple[str, Any, str]]) -> None:
    if problems:
        raise CrossKeyProblems(problems)


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as err:
        raise ValueError(f"not a valid URL: {err}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be {' or '.join(s + '://HOST[:PORT]' for s in schemes)}")
    if port == 0:
        raise ValueError("port 0 is not a port to connect to")
    return value


def _check_listen_host(value: str) -> str:
    if value == "localhost":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            "must be an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1) or localhost"
        ) from None
    return value


def _topic_rule(prefix: str, host_id: str) -> None:
    try:
        FeedTopics.build(prefix, host_id, [])
    except TopicError as err:
        raise ValueError(str(err)) from None


class _Section(BaseModel):
    # strict: no "yes" for a boolean, no true for a number; paths still come from strings.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class JointConfig(_Section):
    """Tuning of the joint controller (palsd/core/controller.py, docs/controller.md)."""

    host_fixed_w: float = Field(
        345.0,
        ge=0,
        le=100_000,
        description="fixed host draw in P_host = 1.05 x sum(GPU power) + this (PALS's IPMI "
        "fit); the controller maximises tokens per joule of P_host",
    )
    low_margin: float = Field(
        0.25, gt=0, lt=1, description="SLO headroom below this share raises the cap"
    )
    high_margin: float = Field(
        0.50, gt=0, lt=1, description="SLO headroom above this share allows probing a lower cap"
    )
    dwell_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="a cap is judged only after holding this long; keep it >= scrape.window_s",
    )
    cap_step_w: float = Field(
        25.0, gt=0, le=500, description="step of the tokens/J search over caps"
    )
    batch_memory_s: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="a batch limit shrunk for ITL is not grown back to for this long",
    )

    @model_validator(mode="after")
    def _margins_ordered(self) -> JointConfig:
        if self.high_margin <= self.low_margin:
            raise ValueError("control.joint.high_margin must be above control.joint.low_margin")
        return self


class ControlConfig(_Section):
    period_s: float = Field(0.5, gt=0.01, le=60, description="control period, seconds")
    dry_run: bool = Field(False, description="read everything, log the limits, set nothing")
    controller: Literal["joint", "demand_split"] = "demand_split"
    max_raise_w_per_tick: float | None = Field(50.0, gt=0, le=100_000)
    joint: JointConfig = Field(
        default_factory=JointConfig, description="tuning of the joint controller"
    )


class GpuConfig(_Section):
    backend: Literal["nvml", "sim"] = "nvml"
    sim_url: str | None = Field(None, description="base URL of `palsd sim-host` (backend sim)")
    indices: list[GpuIndex] | None = Field(None, description="GPU indices to control; None: all")
    timeout_s: float = Field(1.0, gt=0, le=30)

    @field_validator("sim_url")
    @classmethod
    def _sim_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, ("http", "https"))

    @model_validator(mode="after")
    def _sim_needs_url(self) -> GpuConfig:
        problems: list[tuple[str, Any, str]] = []
        if self.backend == "sim" and not self.sim_url:
            problems.append(
                ("gpu.sim_url", None, "gpu.sim_url is required when gpu.backend is 'sim'")
            )
        if self.indices is not None and len(set(self.indices)) != len(self.indices):
            problems.append(("gpu.indices", self.indices, "each GPU index may appear once"))
        _raise_all(problems)
        return self


class BudgetConfig(_Section):
    default_w: float | None = Field(None, gt=0, le=1_000_000, description="host budget, W")
    fallback_w: float | None = Field(
        None, gt=0, le=1_000_000, description="budget used while the facility feed is silent"
    )
    max_override_ttl_s: float | None = Field(None, gt=0, le=YEAR_S)

    @model_validator(mode="after")
    def _fallback_not_above_default(self) -> BudgetConfig:
        if (
            self.fallback_w is not None
            and self.default_w is not None
            and self.fallback_w > self.default_w
        ):
            _raise_all(
                [
                    (
                        "budget.fallback_w",
                        self.fallback_w,
                        f"must not exceed budget.default_w ({self.default_w})",
                    )
                ]
            )
        return self


class SloConfig(_Section):
    ttft_s: float | None = Field(None, gt=0, le=3600)
    ttft_quantile: float = 0.9
    itl_s: float | None = Field(None, gt=0, le=600)
    itl_quantile: float = 0.9
    min_generation_tokens_per_s: float | None = Field(None, ge=0, le=1e9)

    @field_validator("ttft_quantile", "itl_quantile")
    @classmethod
    def _known_quantile(cls, value: float) -> float:
        if value not in (0.5, 0.9, 0.99):
            raise ValueError("allowed quantiles are 0.5, 0.9 and 0.99")
        return value


class ServerConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(pattern=r"^https?://")
    gpus: list[GpuIndex] = Field(min_length=1)
    slo: SloConfig = SloConfig()
    admin_token_file: Path | None = Field(None, strict=False)
    min_batch_limit: int = Field(1, ge=1, le=1_000_000)
    max_batch_limit: int | None = Field(None, ge=1, le=1_000_000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("http", "https"))

    @model_validator(mode="after")
    def _batch_range(self) -> ServerConfig:
        problems: list[tuple[str, Any, str]] = []
        if self.max_batch_limit is not None and self.min_batch_limit > self.max_batch_limit:
            problems.append(
                (
                    "min_batch_limit",
                    self.min_batch_limit,
                    f"must not exceed max_batch_limit ({self.max_batch_limit})",
                )
            )
        if len(set(self.gpus)) != len(self.gpus):
            problems.append(("gpus", self.gpus, "each GPU index may appear once"))
        _raise_all(problems)
        return self


class ScrapeConfig(_Section):
    timeout_s: float = Field(1.0, gt=0, le=30)
    window_s: float = Field(10.0, gt=0, le=600)


class TcpApiConfig(_Section):
    enabled: bool = False
    host: Literal["127.0.0.1", "::1", "localhost"] = "127.0.0.1"
    port: int = Field(9102, ge=0, le=65535)
    token_file: Path | None = Field(None, strict=False)

    @model_validator(mode="after")
    def _token_required(self) -> TcpApiConfig:
        if self.enabled and self.token_file is None:
            _raise_all(
                [
                    (
                        "api.tcp.token_file",
                        None,
                        "api.tcp.token_file is required when api.tcp.enabled is true",
                    )
                ]
            )
        return self


class ApiConfig(_Section):
    socket: Path = Field(Path("/run/palsd/palsd.sock"), strict=False)
    admin_group: str | None = Field("palsd", description="group whose members may change")
    tcp: TcpApiConfig = TcpApiConfig()


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9101, ge=0, le=65535)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_listen_host(value)


class StateConfig(_Section):
    dir: Path = Field(Path("/var/lib/palsd"), strict=False)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class MqttGroupConfig(_Section):
    topic: str = Field(min_length=1, description="group budget topic, under the prefix")
    share: float = Field(gt=0, le=1, description="this host's share of the group budget")
    # A fleet coordinator moves this group's power (docs/fleet.md): its allocations arrive on
    # <group>/alloc/<coordinator>/<host_id>; the share is then only the fallback.
    coordinators: list[str] = Field(
        [], description="ids of the coordinators allocating this group (docs/fleet.md)"
    )
    hold_s: float = Field(5.0, gt=0, le=3600, description="fleet: group budget memory, s")

    @field_validator("coordinators")
    @classmethod
    def _coordinator_ids(cls, value: list[str]) -> list[str]:
        for c in value:
            if not c or any(ch in c for ch in "/+#\0") or c != c.strip():
                raise ValueError(f"coordinator id {c!r} must be one topic level")
        if len(set(value)) != len(value):
            raise ValueError("coordinator ids must be unique")
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        try:
            FeedTopics.build("palsd", "this-host", [(value, 1.0)])
        except TopicError as err:
            raise ValueError(str(err).split(": ", 1)[-1]) from None
        return value


class MqttConfig(_Section):
    enabled: bool = False
    url: str = Field("mqtt://127.0.0.1:1883", pattern=r"^mqtts?://")
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    username: str | None = None
    password_file: Path | None = Field(None, strict=False)
    ca_file: Path | None = Field(None, strict=False)
    cert_file: Path | None = Field(None, strict=False)
    key_file: Path | None = Field(None, strict=False)
    topic_prefix: str = Field("palsd", min_length=1)
    host_id: str | None = Field(None, description="this host's name in topics; default hostname")
    groups: list[MqttGroupConfig] = []
    hmac_key_file: Path | None = Field(None, strict=False)
    require_signature: bool = False
    max_budget_w: float = Field(
        100_000.0, gt=0, le=10_000_000, description="larger budgets are rejected"
    )
    max_ttl_s: float = Field(86_400.0, gt=0, le=YEAR_S)
    max_clock_skew_s: float = Field(30.0, ge=0, le=3600)
    reconnect_min_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    status_interval_s: float = Field(5.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("mqtt", "mqtts"))

    # The same topic rules the feed applies (palsd.feed.topics), so a config accepted here
    # starts the feed.
    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        _topic_rule(value, "palsd-host")
        return value

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, value: str | None) -> str | None:
        if value is not None:
            _topic_rule("palsd", value)
        return value

    @model_validator(mode="after")
    def _signature_needs_key(self) -> MqttConfig:
        problems: list[tuple[str, Any, str]] = []
        if self.require_signature and self.hmac_key_file is None:
            problems.append(
                (
                    "mqtt.hmac_key_file",
                    None,
                    "mqtt.hmac_key_file is required when mqtt.require_signature is true",
                )
            )
        if self.reconnect_min_s > self.reconnect_max_s:
            problems.append(
                (
                    "mqtt.reconnect_min_s",
                    self.reconnect_min_s,
                    f"must not exceed mqtt.reconnect_max_s ({self.reconnect_max_s})",
                )
            )
        if self.key_file is not None and self.cert_file is None:
            problems.append(("mqtt.key_file", str(self.key_file), "needs mqtt.cert_file"))
        try:  # groups that collide with the host id or with each other
            FeedTopics.build(
                "palsd", self.host_id or "palsd-host", [(g.topic, g.share) for g in self.groups]
            )
        except TopicError as err:
            problems.append(("mqtt.groups", [g.topic for g in self.groups], str(err)))
        _raise_all(problems)
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

    @field_validator("servers")
    @classmethod
    def _servers_consistent(cls, servers: list[ServerConfig]) -> list[ServerConfig]:
        _raise_all(_server_problems([(s.name, s.gpus) for s in servers]))
        return servers

    @model_validator(mode="after")
    def _sections_consistent(self) -> PalsdConfig:
        _raise_all(_cross_section_problems(vars(self)))
        return self


def _server_problems(entries: list[tuple[Any, Any]]) -> list[tuple[str, Any, str]]:
    """Names unique, each GPU in one server. `entries` are (name, gpus) per servers[n]; an
    entry whose name or gpus is of the wrong type (reported on its own) is skipped."""
    problems: list[tuple[str, Any, str]] = []
    seen: dict[str, int] = {}
    owner: dict[int, int] = {}
    for n, (name, gpus) in enumerate(entries):
        if isinstance(name, str):
            if name in seen:
                rule = f"repeats the name of servers[{seen[name]}]"
                problems.append((f"servers[{n}].name", name, rule))
            seen.setdefault(name, n)
        for g in gpus if isinstance(gpus, list) else []:
            if type(g) is not int:
                continue
            if g in owner and owner[g] != n:
                rule = f"GPU {g} is listed by both servers[{owner[g]}] and servers[{n}]"
                problems.append((f"servers[{n}].gpus", gpus, rule))
            owner.setdefault(g, n)
    return problems


def _cross_section_problems(sections: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Rules between sections. `sections` may lack a section that failed its own validation:
    a rule needing it is skipped, every other rule still runs (see parse_config)."""
    problems: list[tuple[str, Any, str]] = []
    gpu, servers = sections.get("gpu"), sections.get("servers")
    if gpu is not None and gpu.indices is not None and servers is not None:
        for n, s in enumerate(servers):
            outside = sorted(set(s.gpus) - set(gpu.indices))
            if outside:
                problems.append(
                    (f"servers[{n}].gpus", s.gpus, f"GPUs {outside} are not in gpu.indices")
                )
    metrics, api = sections.get("metrics"), sections.get("api")
    if (
        metrics is not None
        and api is not None
        and metrics.enabled
        and api.tcp.enabled
        and metrics.port != 0
        and metrics.port == api.tcp.port
    ):
        problems.append(("api.tcp.port", api.tcp.port, "is also metrics.port; each needs its own"))
    return problems


def _valid_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Each top-level section validated on its own (defaults for absent ones); the ones that
    fail are left out."""
    out: dict[str, Any] = {}
    for name, field in PalsdConfig.model_fields.items():
        try:
            value = (
                TypeAdapter(Any if field.annotation is None else field.annotation).validate_python(
                    data[name]
                )
                if name in data
                else field.get_default(call_default_factory=True)
            )
        except (ValidationError, RecursionError):
            continue
        out[name] = value
    return out


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


def show(value: Any, limit: int = 80) -> str:
    """repr() for messages: bounded, and safe for integers too long to print."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    try:
        text = repr(value)
    except ValueError:
        text = f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_prefix(loc: tuple[Any, ...]) -> str:
    """Cross-key rules name keys from the top, except a server's, which are relative to its
    servers[n] (one model serves every entry)."""
    if len(loc) >= 2 and loc[0] == "servers" and isinstance(loc[1], int):
        return f"servers[{loc[1]}]."
    return ""


def describe_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-after"))
        key = _loc(loc)
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, CrossKeyProblems):
            prefix = _section_prefix(loc)
            for sub_key, value, rule in cause.problems:
                lines.append(f"{prefix}{sub_key}: value {show(value)} is not allowed: {rule}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {show(e['input'])}); check the spelling")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: value {show(e['input'])} is not allowed: {msg}")
    return lines


def parse_config(data: Any, source: str = "<config>") -> PalsdConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return PalsdConfig.model_validate(data)
    except ValidationError as err:
        problems = describe_errors(err)
        locs = [e["loc"] for e in err.errors()]
        late: list[tuple[str, Any, str]] = []
        servers = data.get("servers")
        if isinstance(servers, list) and any(len(loc) > 1 and loc[0] == "servers" for loc in locs):
            # An entry failed, so the rules across servers did not run: run them on the raw
            # entries (each well-typed name and GPU list), so one run reports every problem.
            late += _server_problems(
                [
                    (e.get("name"), e.get("gpus")) if isinstance(e, dict) else (None, None)
                    for e in servers
                ]
            )
        if any(locs):
            # Likewise the rules between sections: run those whose sections are valid.
            late += _cross_section_problems(_valid_sections(data))
        problems += [
            f"{key}: value {show(value)} is not allowed: {rule}" for key, value, rule in late
        ]
        raise ConfigError(source, problems) from None
    except RecursionError:
        raise ConfigError(source, ["(top level): nested too deeply"]) from None


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _walk(root: yaml.Node) -> Iterator[str]:
    """Problems of the document's shape, found on the node graph before anything is built:
    duplicate keys, and more aliases, nodes (counting each alias's expansion) or depth than a
    palsd config ever needs. Linear in the nodes written, whatever they would expand to."""
    aliases = 0
    expanded: dict[int, int] = {}  # node id -> node count once expanded
    seen: set[int] = set()
    # Iterative post-order walk: (node, depth, children done?)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            yield (
                f"(top level): nested deeper than {MAX_DEPTH} levels (aliases expanded); "
                "refused unexpanded"
            )
            return
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not done:
            if id(node) in seen:  # written once, used again: an alias
                aliases += 1
                if aliases > MAX_ALIASES:
                    yield f"(top level): more than {MAX_ALIASES} aliases; refused unexpanded"
                    return
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                yield from _duplicates(node)
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children if id(c) not in expanded)
            continue
        expanded[id(node)] = 1 + sum(expanded.get(id(c), 1) for c in children)
        if expanded[id(node)] > MAX_EXPANDED_NODES:
            yield (
                f"(top level): expands to more than {MAX_EXPANDED_NODES} values "
                "(aliases repeat what they point at); refused unexpanded"
            )
            return


def _duplicates(node: yaml.MappingNode) -> Iterator[str]:
    first: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
            continue
        line = key.start_mark.line + 1
        if key.value in first:
            yield (
                f"{key.value}: duplicate key at line {line} (first at line "
                f"{first[key.value]}); the earlier value would be silently ignored"
            )
        else:
            first[key.value] = line


def _parse_yaml(raw: bytes, source: str) -> tuple[Any, list[str]]:
    """(data, problems of the file itself); data is None when it cannot be trusted."""
    if len(raw) > MAX_CONFIG_BYTES:
        return None, [f"(file): larger than {MAX_CONFIG_BYTES} bytes; not a palsd config"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [
            f"(file): not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start} ({err.reason})"
        ]
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, []
        problems = list(_walk(node))
        if any(p.startswith("(top level)") for p in problems):
            return None, problems
        return loader.construct_document(node), problems
    except yaml.YAMLError as err:
        return None, [f"(file): not valid YAML: {' '.join(str(err).split())}"]
    except RecursionError:
        return None, [f"(top level): nested deeper than {MAX_DEPTH} levels"]
    finally:
        loader.dispose()


def _secret_problem(path: Path, must_have_content: bool = True) -> str | None:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        with open(path, "rb") as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    if len(data) > MAX_SECRET_BYTES:
        return f"is larger than {MAX_SECRET_BYTES} bytes"
    if must_have_content and not data.strip():
        return "is empty"
    return None


def file_problems(sections: dict[str, Any]) -> list[str]:
    """What the daemon will read or create at start, checked now: secret files that exist,
    can be read and are not empty; TLS material that loads; state and socket paths that are
    not in the way. Only files the configuration will use are checked. `sections` maps each
    section's name to its validated value; a section missing from it is not checked."""
    api, servers, m = sections.get("api"), sections.get("servers"), sections.get("mqtt")
    state_cfg = sections.get("state")
    files: list[tuple[str, Path]] = []
    if api is not None and api.tcp.enabled and api.tcp.token_file is not None:
        files.append(("api.tcp.token_file", api.tcp.token_file))
    for n, server in enumerate(servers or []):
        if server.admin_token_file is not None:
            files.append((f"servers[{n}].admin_token_file", server.admin_token_file))
    if m is not None and m.enabled:
        for key in ("password_file", "hmac_key_file", "ca_file", "cert_file", "key_file"):
            path = getattr(m, key)
            if path is not None:
                files.append((f"mqtt.{key}", path))
    out = []
    for key, path in files:
        problem = _secret_problem(path)
        if problem is not None:
            out.append(f"{key}: value {show(str(path))} is not allowed: the file {problem}")
    if m is not None and m.enabled and not any(line.startswith("mqtt.") for line in out):
        tls_problem = _tls_problem(m)
        if tls_problem is not None:
            out.append(tls_problem)
    if state_cfg is not None and state_cfg.dir.exists() and not state_cfg.dir.is_dir():
        out.append(
            f"state.dir: value {show(str(state_cfg.dir))} is not allowed: it is not a directory"
        )
    sock = None if api is None else api.socket
    if sock is not None and os.path.lexists(sock) and not stat.S_ISSOCK(os.lstat(sock).st_mode):
        out.append(
            f"api.socket: value {show(str(sock))} is not allowed: the path exists and is not "
            "a socket (palsd never replaces such a file)"
        )
    return out


def _tls_problem(m: MqttConfig) -> str | None:
    if urlsplit(m.url).scheme != "mqtts" and m.ca_file is None and m.cert_file is None:
        return None
    try:
        tls = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
        if m.cert_file is not None:
            tls.load_cert_chain(str(m.cert_file), str(m.key_file) if m.key_file else None)
    except (ssl.SSLError, OSError, ValueError) as err:
        key = "mqtt.cert_file" if m.cert_file is not None else "mqtt.ca_file"
        value = m.cert_file if m.cert_file is not None else m.ca_file
        return f"{key}: value {show(str(value))} is not allowed: TLS cannot load it: {err}"
    return None


def load_config(path: Path, *, check_files: bool = True) -> PalsdConfig:
    """Read, parse and validate the file; raise ConfigError listing every problem found.
    `check_files=False` skips the secret/TLS/path checks (palsd restore needs none of them)."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(source, [f"(file): cannot read it: {err.strerror}"]) from None
    data, problems = _parse_yaml(raw, source)
    if data is None:
        # `null` (or `~`) parses without a YAML error: still say what is wrong
        raise ConfigError(source, problems or ["(top level): no settings; expected a mapping"])
    try:
        cfg = parse_config(data, source)
    except ConfigError as err:
        late = (
            file_problems(_valid_sections(data)) if check_files and isinstance(data, dict) else []
        )
        raise ConfigError(source, problems + err.problems + late) from None
    if check_files:
        problems += file_problems(vars(cfg))
    if problems:
        raise ConfigError(source, problems)
    return cfg


# What a reload (SIGHUP) applies to the running daemon; every other changed key waits for a
# restart, and the reload says which.
RELOADABLE_KEYS = ("budget.default_w", "budget.fallback_w", "control.period_s")


def changed_keys(old: PalsdConfig, new: PalsdConfig) -> list[str]:
    """Dotted keys whose values differ between two configurations (a list, such as `servers`,
    compares as one key)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            out.append(key)

    walk(old.model_dump(), new.model_dump(), "")
    return out


def with_reloaded(running: PalsdConfig, new: PalsdConfig) -> PalsdConfig:
    """The configuration in force after a reload: `running` with the reloadable keys of `new`."""
    out = running
    for key in RELOADABLE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(new, section), name)
        part = getattr(out, section).model_copy(update={name: value})
        out = out.model_copy(update={section: part})
    return out
