"""Generates the key reference in docs/configuration.md from the pydantic schema in config.py.

    python tools/gen_config_doc.py          # rewrite the reference in place
    python tools/gen_config_doc.py --check  # exit 1 when the file is out of date

Only the text between the BEGIN/END markers is generated; the prose around it is kept.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from palsd.config import PalsdConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED REFERENCE (tools/gen_config_doc.py) -->"
END = "<!-- END GENERATED REFERENCE -->"

# Units follow the suffix convention of the code base; the longest suffix wins.
_UNITS = {
    "_w_per_tick": "W per tick",
    "_per_s": "per second",
    "_w": "W",
    "_s": "s",
    "_j": "J",
    "_file": "path",
    "port": "TCP port",
    "dir": "path",
    "socket": "path",
}


# What each key means, for keys whose schema field carries no description (a description in
# config.py wins). --check fails when a key has neither, or when an entry here names no key.
MEANINGS = {
    "control": "the control loop",
    "control.controller": "`demand_split`: split the budget by demand; `joint`: feedback on "
    "caps and batch limits against the SLOs",
    "control.max_raise_w_per_tick": "largest raise of one GPU's limit per tick (lowering is "
    "never slowed); null: unlimited",
    "gpu": "where GPU telemetry comes from and limits go",
    "gpu.backend": "`nvml`: the real GPUs; `sim`: a `palsd sim-host` process",
    "gpu.timeout_s": "deadline for one GPU backend call",
    "budget": "the host power budget (the sum of the GPU limits palsd sets)",
    "budget.max_override_ttl_s": "longest local override (`palsctl set-budget --ttl`); when set, "
    "every override needs a TTL",
    "servers": "the vLLM servers on this host; each GPU belongs to at most one",
    "servers[].name": "the server's name in status, metrics and logs",
    "servers[].url": "base URL of the vLLM server (its /metrics and the plugin's admin endpoint)",
    "servers[].gpus": "indices of the GPUs this server runs on",
    "servers[].slo": "latency and throughput objectives",
    "servers[].admin_token_file": "file holding the bearer token for the batch-limit endpoint",
    "servers[].min_batch_limit": "lowest batch limit palsd sets",
    "servers[].max_batch_limit": "highest batch limit palsd sets; null: the server's max_num_seqs",
    "servers[].slo.ttft_s": "time-to-first-token objective at ttft_quantile; null: none",
    "servers[].slo.ttft_quantile": "quantile of ttft_s: 0.5, 0.9 or 0.99",
    "servers[].slo.itl_s": "inter-token latency objective at itl_quantile; null: none",
    "servers[].slo.itl_quantile": "quantile of itl_s: 0.5, 0.9 or 0.99",
    "servers[].slo.min_generation_tokens_per_s": "throughput floor; null: none",
    "scrape": "scraping vLLM's /metrics",
    "scrape.timeout_s": "deadline for one scrape",
    "scrape.window_s": "window for rates and latency quantiles",
    "api": "the local API (palsctl)",
    "api.socket": "Unix socket; anyone may read, changes need root or admin_group",
    "api.tcp": "optional loopback TCP listener with a bearer token",
    "api.tcp.enabled": "listen on TCP as well",
    "api.tcp.host": "loopback address to listen on",
    "api.tcp.port": "TCP port (0: any free port)",
    "api.tcp.token_file": "file holding the bearer token; required when enabled",
    "metrics": "the Prometheus exporter",
    "metrics.enabled": "serve /metrics",
    "metrics.host": "address to listen on",
    "metrics.port": "port to listen on (0: any free port)",
    "state": "files that must survive a crash",
    "state.dir": "where the record of original limits lives (`palsd restore` reads it)",
    "logging": "structured logs",
    "logging.level": "lowest level logged",
    "logging.format": "`auto`: console on a terminal, JSON otherwise",
    "mqtt": "the facility budget feed",
    "mqtt.enabled": "subscribe to budgets and publish status",
    "mqtt.url": "broker URL; `mqtts://` for TLS",
    "mqtt.client_id": "MQTT client id; null: derived from host_id",
    "mqtt.keepalive_s": "MQTT keepalive",
    "mqtt.username": "broker user name",
    "mqtt.password_file": "file holding the broker password",
    "mqtt.ca_file": "CA bundle that signs the broker's certificate",
    "mqtt.cert_file": "client certificate for mutual TLS",
    "mqtt.key_file": "client key for mutual TLS",
    "mqtt.topic_prefix": "first level of every topic",
    "mqtt.groups": "group budgets this host takes a share of",
    "mqtt.hmac_key_file": "file holding the HMAC-SHA256 key that signs budget messages",
    "mqtt.require_signature": "reject unsigned budget messages",
    "mqtt.max_ttl_s": "longer message lifetimes are rejected",
    "mqtt.max_clock_skew_s": "messages stamped further in the future are rejected",
    "mqtt.reconnect_min_s": "first reconnect delay (doubles up to reconnect_max_s)",
    "mqtt.reconnect_max_s": "longest reconnect delay",
    "mqtt.status_interval_s": "how often status is published",
}


def _unit(name: str) -> str:
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if name.endswith(suffix):
            return _UNITS[suffix]
    return ""


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The section model a field holds, and whether it is a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        (inner,) = get_args(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, True
    return None, False


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:  # e.g. a list of bounded integers: name the type and its bounds
        base, *meta = get_args(annotation)
        bounds = (
            _constraints(
                FieldInfo.merge_field_infos(*[m for m in meta if isinstance(m, FieldInfo)])
            )
            if any(isinstance(m, FieldInfo) for m in meta)
            else ""
        )
        return _type_name(base) + (f" ({bounds})" if bounds else "")
    if origin in (types.UnionType, typing.Union):
        parts = [_type_name(a) for a in get_args(annotation) if a is not type(None)]
        nullable = type(None) in get_args(annotation)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is Literal:
        return "one of " + ", ".join(f"`{a!r}`" for a in get_args(annotation))
    if origin is list:
        (inner,) = get_args(annotation)
        return f"list of {_type_name(inner)}"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "(required)"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _constraints(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for cls, attr, sign in (
            (at.Gt, "gt", ">"),
            (at.Ge, "ge", ">="),
            (at.Lt, "lt", "<"),
            (at.Le, "le", "<="),
        ):
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length} long")
        if isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length} long")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _meaning(key: str, field: FieldInfo, seen: set[str]) -> str:
    seen.add(key)
    return field.description or MEANINGS.get(key, "")


def _rows(model: type[BaseModel], prefix: str, seen: set[str]) -> list[tuple[str, list[str]]]:
    """(section heading, table rows) for model and, after it, each nested section."""
    rows: list[str] = []
    nested: list[tuple[str, list[str]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub, is_list = _model_of(field.annotation)
        if sub is not None:
            sub_prefix = f"{key}[]." if is_list else f"{key}."
            what = f"list of `{sub_prefix[:-1]}` entries" if is_list else "section"
            rows.append(
                f"| `{key}` | {what} | {_default(field)} | | | "
                f"{_cell(_meaning(key, field, seen))} |"
            )
            nested.extend(_rows(sub, sub_prefix, seen))
            continue
        cells = [
            f"`{key}`",
            _cell(_type_name(field.annotation)),
            _cell(_default(field)),
            _unit(name),
            _cell(_constraints(field)),
            _cell(_meaning(key, field, seen)),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    title = prefix.rstrip(".") or "top level"
    return [(title, rows), *nested]


def problems() -> list[str]:
    """Keys without a meaning, and MEANINGS entries that name no key."""
    seen: set[str] = set()
    sections = _rows(PalsdConfig, "", seen)
    out = [
        f"{row.split('`')[1]}: no meaning"
        for _, rows in sections
        for row in rows
        if row.rstrip().endswith("|  |")
    ]
    out += [f"{key}: in MEANINGS but not in the schema" for key in sorted(set(MEANINGS) - seen)]
    return out


def render() -> str:
    out = [BEGIN, ""]
    for title, rows in _rows(PalsdConfig, "", set()):
        if not rows:
            continue
        out += [f"### `{title}`" if title != "top level" else "### Top level", ""]
        out += ["| key | type | default | unit | allowed | meaning |", "|---|---|---|---|---|---|"]
        out += rows
        out.append("")
    out.append(END)
    return "\n".join(out)


def updated(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the BEGIN/END markers are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    bad = problems()
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 1
    current = DOC.read_text()
    new = updated(current)
    if args.check:
        if new != current:
            print(f"{DOC} is out of date: run python tools/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
