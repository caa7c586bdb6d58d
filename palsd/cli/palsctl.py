"""`palsctl`: the operator's client of palsd's local API (status, set-budget, clear-budget)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from palsd.fleet import ctl as fleet_ctl
from palsd.units import parse_duration_s, parse_watts

DEFAULT_SOCKET = Path("/run/palsd/palsd.sock")
DEV_SOCKET = Path("run/palsd.sock")  # what `make run` uses, relative to the checkout


def default_socket() -> Path:
    env = os.environ.get("PALSD_SOCKET")
    if env:
        return Path(env)
    if DEV_SOCKET.exists() and not DEFAULT_SOCKET.exists():
        return DEV_SOCKET
    return DEFAULT_SOCKET


class ApiError(Exception):
    pass


class Client:
    def __init__(self, socket: Path | None, url: str | None, token: str | None, timeout_s: float):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)
            self.where = url
        else:
            path = socket or default_socket()
            transport = httpx.HTTPTransport(uds=str(path))
            self._http = httpx.Client(
                transport=transport, base_url="http://palsd", headers=headers, timeout=timeout_s
            )
            self.where = str(path)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as err:
            raise ApiError(
                f"cannot reach palsd at {self.where}: {err}. Is it running "
                "(systemctl status palsd)? Use --socket or PALSD_SOCKET for another path."
            ) from None
        except httpx.HTTPError as err:
            raise ApiError(f"request to palsd at {self.where} failed: {err}") from None
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(f"palsd answered {resp.status_code} with a non-JSON body") from None
        if resp.status_code >= 400:
            raise ApiError(f"palsd refused ({resp.status_code}): {data.get('error', data)}")
        return data


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render_status(s: dict[str, Any]) -> str:
    b = s["budget"]
    c = s["controller"]
    lines = []
    expires = ""
    if b.get("expires_at"):
        expires = f", expires in {max(0.0, b['expires_at'] - time.time()):.0f}s"
    lines.append(
        f"budget   {_fmt(b['effective_w'], ' W')} ({b['source']}{expires})"
        + ("  INFEASIBLE: below the sum of minimum limits" if b.get("infeasible") else "")
    )
    power = s.get("power", {})
    lines.append(
        f"power    {_fmt(power.get('sum_power_w'), ' W')} drawn, "
        f"{_fmt(power.get('sum_limit_w'), ' W')} in limits"
    )
    lines.append(
        f"control  {c['name']}, mode {c['mode']}"
        + (", DRY RUN (nothing is set)" if c.get("dry_run") else "")
    )
    rows = [["GPU", "NAME", "POWER", "LIMIT", "RANGE"]]
    for g in s["gpus"]:
        rows.append(
            [
                str(g["index"]),
                g["name"],
                _fmt(g["power_w"], " W"),
                _fmt(g["power_limit_w"], " W"),
                f"{g['min_limit_w']:.0f}-{g['max_limit_w']:.0f} W",
            ]
        )
    lines += ["", _table(rows)]
    if s["servers"]:
        rows = [["SERVER", "UP", "RUNNING", "WAITING", "BATCH", "BATCH CTL", "TOK/S", "SLO", "URL"]]
        notes = []
        for v in s["servers"]:
            slo = {True: "met", False: "MISSED", None: "-"}[v.get("slo_met")]
            control = v.get("batch_control") or "-"
            rows.append(
                [
                    v["name"],
                    "yes" if v["up"] else "NO",
                    _fmt(v["running"]),
                    _fmt(v["waiting"]),
                    _fmt(v["batch_limit"]),  # what the server reports, never palsd's wish
                    control if control in ("ok", "unknown", "-") else control.upper(),
                    _fmt(v.get("generation_tokens_per_s"), "", 0),
                    slo,
                    v["url"],
                ]
            )
            if control not in ("ok", "unknown", "-"):
                why = v.get("batch_control_reason") or "no reason given"
                notes.append(f"  {v['name']}: batch control {control}, cap only: {why}")
            if not v["up"] and v.get("stale_reason"):
                notes.append(f"  {v['name']}: signals stale: {v['stale_reason']}")
        lines += ["", _table(rows)] + (["", *notes] if notes else [])
    last = c.get("last_decision")
    if last:
        lines += ["", "last decision:"] + [f"  - {r}" for r in last["reasons"]]
    feed = s.get("feed")
    if feed:
        lines += ["", "feed     " + ", ".join(f"{k}={v}" for k, v in feed.items())]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palsctl", description=__doc__)
    p.add_argument(
        "--socket",
        type=Path,
        help="palsd's Unix socket (default: PALSD_SOCKET, "
        "./run/palsd.sock in a checkout running `make run`, /run/palsd/palsd.sock)",
    )
    p.add_argument(
        "--url", help="loopback TCP URL instead of the socket, e.g. http://127.0.0.1:9102"
    )
    p.add_argument("--token-file", type=Path, help="bearer token for --url")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("status", help="show GPUs, servers, budget and the last decision")
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="refresh until Ctrl-C")
    sb = sub.add_parser("set-budget", help="set a local budget override, e.g. 2400W")
    sb.add_argument("watts", help="e.g. 2400W, 2.4kW")
    sb.add_argument("--ttl", help="expiry, e.g. 10m; default: until cleared")
    sb.add_argument("--reason", help="free text shown in status and logs")
    sub.add_parser("clear-budget", help="remove the local budget override")
    sub.add_parser("health", help="exit 0 if the control loop is ticking")
    fleet_ctl.add_arguments(sub.add_parser("fleet", help="a fleet coordinator's group view"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fleet":
        return fleet_ctl.main(args)
    token = None
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as err:
            print(
                f"palsctl: cannot read token file {args.token_file}: {err.strerror}",
                file=sys.stderr,
            )
            return 2
    client = Client(args.socket, args.url, token, args.timeout)
    try:
        if args.command == "status":
            while True:
                status = client.call("GET", "/v1/status")
                if args.json:
                    print(json.dumps(status, indent=2))
                else:
                    if args.watch:
                        print("\033[2J\033[H", end="")
                    print(render_status(status))
                if not args.watch:
                    return 0
                time.sleep(args.watch)
        if args.command == "set-budget":
            try:
                watts = parse_watts(args.watts)
                ttl = parse_duration_s(args.ttl) if args.ttl else None
            except ValueError as err:
                print(f"palsctl: {err}", file=sys.stderr)
                return 2
            if ttl is not None and ttl <= 0:
                print("palsctl: --ttl must be positive", file=sys.stderr)
                return 2
            data = client.call(
                "PUT",
                "/v1/budget/override",
                {"budget_w": watts, "ttl_s": ttl, "reason": args.reason},
            )
            b = data["budget"]
            print(
                f"override set to {watts:.0f} W; budget in force {b['effective_w']} W "
                f"({b['source']})"
            )
            return 0
        if args.command == "clear-budget":
            data = client.call("DELETE", "/v1/budget/override")
            b = data["budget"]
            print(f"override cleared; budget in force {b['effective_w']} W ({b['source']})")
            return 0
        if args.command == "health":
            try:
                data = client.call("GET", "/v1/health")
            except ApiError as err:
                print(f"palsctl: {err}", file=sys.stderr)
                return 1
            print(json.dumps(data))
            return 0 if data.get("ok") else 1
    except ApiError as err:
        print(f"palsctl: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
