"""`palsctl fleet status`: one coordinator's view of its group, from its /status endpoint
(served beside /metrics on the coordinator's metrics port)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

DEFAULT_COORDINATOR_URL = "http://127.0.0.1:9103"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    st = sub.add_parser("status", help="the group: budget, each host's allocation and demand")
    st.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR_URL,
        help=f"the coordinator's metrics URL (default {DEFAULT_COORDINATOR_URL})",
    )
    st.add_argument("--json", action="store_true", help="one JSON object")


def _w(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}"


def render(status: dict[str, Any]) -> str:
    lines = [
        f"coordinator {status.get('coordinator')}  group {status.get('group_topic')}  "
        f"connected {status.get('connected')}",
        f"group budget {_w(status.get('group_budget_w'))} W  "
        f"ledger {_w(status.get('may_hold_total_w'))} W  "
        f"unmet demand {_w(status.get('unmet_w'))} W  "
        f"warming up {status.get('warming_up')}  "
        f"raise blocked {len(status.get('raise_blocked') or [])}",
    ]
    rows = [["HOST", "SHARE", "ALLOC_W", "TARGET_W", "MAY_HOLD_W", "IN_FORCE_W", "DEMAND_W",
             "DRAW_W", "URGENCY", "AGE_S", "STALE"]]  # fmt: skip
    for host, h in sorted((status.get("hosts") or {}).items()):
        rows.append(
            [
                host,
                f"{h.get('share', 0):.3f}",
                _w(h.get("allocated_w")),
                _w(h.get("target_w")),
                _w(h.get("may_hold_w")),
                _w(h.get("in_force_w")),
                _w(h.get("demand_w")),
                _w(h.get("draw_w")),
                "-" if h.get("urgency") is None else f"{h['urgency']:.2f}",
                "-" if h.get("status_age_s") is None else f"{h['status_age_s']:.1f}",
                "yes" if h.get("stale") else "",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    url = args.coordinator.rstrip("/") + "/status"
    try:
        resp = httpx.get(url, timeout=getattr(args, "timeout", 5.0))
        status = resp.json()
    except (httpx.HTTPError, ValueError) as err:
        print(
            f"palsctl: cannot read the coordinator at {url}: {err}. Is it running "
            "(systemctl status palsd-coordinator)? Use --coordinator for another URL.",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return 0
