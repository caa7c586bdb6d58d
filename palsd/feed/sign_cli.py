"""`palsd sign-budget`: the reference signer. Prints one signed budget (or price) message, ready
for `mosquitto_pub -s`, made exactly as docs/mqtt.md ("Signing") says: for operators, for tests,
and as the answer to "what should my publisher's bytes be?".

    palsd sign-budget --key-file /etc/palsd/feed.key --topic dc1/palsd/gpu-07/budget \\
        --budget-w 4000 --ttl-s 300 --sender ops | mosquitto_pub -t dc1/palsd/gpu-07/budget -s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from palsd.feed.payload import MAX_SEQ, Rejected, Rules, decode_budget, decode_price
from palsd.feed.signing import NotCanonical, signed_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", type=Path, required=True, help="the shared HMAC key file")
    parser.add_argument("--topic", required=True, help="the full topic it will be published on")
    parser.add_argument(
        "--kind",
        choices=("budget", "price"),
        default=None,
        help="default: price for a topic ending in /price, else budget",
    )
    parser.add_argument("--budget-w", type=float, help="the budget in watts (kind budget)")
    parser.add_argument("--price-per-mwh", type=float, help="the price (kind price)")
    parser.add_argument("--sender", default="ops", help="sequence numbers are kept per sender")
    parser.add_argument(
        "--seq", type=int, default=None, help="default: unix time in milliseconds (grows)"
    )
    parser.add_argument("--issued-at", type=float, default=None, help="default: now")
    parser.add_argument("--ttl-s", type=float, default=None, help="default 300 for a budget")
    parser.add_argument("--expires-at", type=float, default=None, help="instead of --ttl-s")
    parser.add_argument("--reason", default=None, help="free text for operators")
    parser.add_argument(
        "--no-check", action="store_true", help="print it even if palsd would reject it now"
    )
    parser.add_argument(
        "--fields",
        default=None,
        help="a JSON object of fields to sign as given (no other field options, no checks)",
    )


def _fail(message: str) -> int:
    print(f"palsd sign-budget: {message}", file=sys.stderr)
    return 2


def _read_key(path: Path) -> bytes | str:
    try:
        key = path.read_text().strip()
    except OSError as err:
        return f"cannot read --key-file {path}: {err.strerror or err}"
    except UnicodeDecodeError:
        return f"--key-file {path} is not UTF-8 text"
    if not key:
        return f"--key-file {path} is empty"
    return key.encode()


def _fields(args: argparse.Namespace, kind: str, now: float) -> dict[str, Any] | str:
    fields: dict[str, Any] = {
        "seq": args.seq if args.seq is not None else int(now * 1000),
        "issued_at": args.issued_at if args.issued_at is not None else int(now),
        "sender": args.sender,
    }
    if kind == "budget":
        if args.budget_w is None or args.price_per_mwh is not None:
            return "a budget needs --budget-w (and no --price-per-mwh)"
        fields["budget_w"] = args.budget_w
    else:
        if args.price_per_mwh is None or args.budget_w is not None:
            return "a price needs --price-per-mwh (and no --budget-w)"
        fields["price_per_mwh"] = args.price_per_mwh
    if args.ttl_s is not None and args.expires_at is not None:
        return "give --ttl-s or --expires-at, not both"
    if args.expires_at is not None:
        fields["expires_at"] = args.expires_at
    elif args.ttl_s is not None or kind == "budget":
        fields["ttl_s"] = args.ttl_s if args.ttl_s is not None else 300
    if args.reason is not None:
        fields["reason"] = args.reason
    for name in ("budget_w", "price_per_mwh", "issued_at", "ttl_s", "expires_at"):
        # whole numbers as integers: the message reads as the operator typed it
        value = fields.get(name)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            fields[name] = int(value)
    if not 0 <= fields["seq"] <= MAX_SEQ:
        return f"--seq {fields['seq']} is not in 0..{MAX_SEQ}"
    return fields


def main(args: argparse.Namespace) -> int:
    kind = args.kind or ("price" if args.topic.rstrip("/").endswith("/price") else "budget")
    key = _read_key(args.key_file)
    if isinstance(key, str):
        return _fail(key)
    now = time.time()
    check = args.fields is None and not args.no_check
    if args.fields is not None:
        try:
            fields = json.loads(args.fields)
        except ValueError as err:
            return _fail(f"--fields is not JSON: {err}")
        if not isinstance(fields, dict):
            return _fail("--fields must be a JSON object")
    else:
        built = _fields(args, kind, now)
        if isinstance(built, str):
            return _fail(built)
        fields = built
    try:
        payload = signed_message(key, args.topic, kind, fields)
    except NotCanonical as err:
        return _fail(f"these fields cannot be signed: {err}")
    if check:
        # What palsd would say about it (loose bounds: the host's own limits are not known here).
        rules = Rules(float("inf"), float("inf"), 0.0, require_signature=True, hmac_key=key)
        if kind == "budget":
            result: Any = decode_budget(payload, now, rules, topic=args.topic)
        else:
            result = decode_price(payload, now, rules, topic=args.topic)
        if isinstance(result, Rejected):
            return _fail(f"palsd would reject this message: {result.reason}: {result.detail}")
    sys.stdout.write(payload.decode() + "\n")
    return 0
