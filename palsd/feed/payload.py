"""Budget and price messages: decode, validate, canonical form and HMAC check. Pure, no I/O.

Rules of this file: a message is either fully valid or rejected with one reason label (used as
the `reason` of palsd_mqtt_rejected_total) and a detail for people; nothing is half-applied.
Checks run in a fixed order: size, JSON, object shape, signature, fields, values, times. The
signature comes before the fields so that nothing unauthenticated is interpreted when signing is
required; it covers the topic and the kind too (signing.py). Sequence numbers are checked by
`SeqBook`, kept by the caller. Every function here is total: whatever bytes come in, the answer
is a message or a `Rejected`, never an exception (tests/unit/test_feed_fuzz.py holds it to that).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from palsd.feed.signing import sign, signature_problem

MAX_PAYLOAD_BYTES = 4096
# 2^53 - 1: the largest integer every JSON reader holds exactly (RFC 7493), so the canonical
# form (RFC 8785, numbers as doubles) of two different seqs is never the same.
MAX_SEQ = 2**53 - 1
MAX_ABS_PRICE_PER_MWH = 1_000_000.0
MAX_TEXT = 256

REASONS = (
    "too_large",
    "malformed_json",
    "not_an_object",
    "unknown_field",
    "missing_field",
    "wrong_type",
    "not_finite",
    "not_positive",
    "above_max",
    "bad_seq",
    "conflicting_expiry",
    "bad_expiry",
    "ttl_too_long",
    "from_the_future",
    "expired",
    "missing_signature",
    "bad_signature",
    "replayed_seq",
    "unknown_topic",
)

_COMMON = {"seq", "issued_at", "sender", "ttl_s", "expires_at", "sig"}
BUDGET_FIELDS = frozenset(_COMMON | {"budget_w", "reason"})
PRICE_FIELDS = frozenset(_COMMON | {"price_per_mwh", "reason"})


@dataclass(frozen=True)
class Rejected:
    reason: str  # one of REASONS
    detail: str
    sender: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Rules:
    max_budget_w: float
    max_ttl_s: float
    max_clock_skew_s: float
    require_signature: bool = False
    hmac_key: bytes | None = None


@dataclass(frozen=True)
class BudgetMessage:
    budget_w: float
    seq: int
    issued_at: float
    expires_at: float
    sender: str
    reason: str
    digest: str  # sha256 of the raw bytes: tells a redelivery from a replay


@dataclass(frozen=True)
class PriceMessage:
    price_per_mwh: float
    seq: int
    issued_at: float
    expires_at: float | None
    sender: str
    reason: str
    digest: str


Message = BudgetMessage | PriceMessage


def encode(
    obj: Mapping[str, Any], key: bytes | None = None, *, topic: str = "", kind: str = "budget"
) -> bytes:
    """A message as a sender would publish it: compact JSON with sorted keys, signed for `topic`
    and `kind` when a key is given (signing.signed_message is the same for valid fields; this
    one also writes NaN, for tests of what palsd refuses)."""
    body = {k: v for k, v in obj.items() if k != "sig"}
    if key is not None:
        body["sig"] = sign(key, topic, kind, body)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # Two values for one key: which one counts would depend on the parser.
            raise _Reject("malformed_json", f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse(raw: bytes, allowed: frozenset[str], required: tuple[str, ...]) -> dict[str, Any]:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise _Reject("too_large", f"{len(raw)} bytes, at most {MAX_PAYLOAD_BYTES}")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _Reject("malformed_json", str(err)[:200]) from None
    if not isinstance(obj, dict):
        raise _Reject("not_an_object", f"a JSON {type(obj).__name__}, expected an object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _Reject("unknown_field", f"unknown field(s) {unknown}; allowed {sorted(allowed)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise _Reject("missing_field", f"missing field(s) {missing}")
    return obj


def _check_signature(obj: dict[str, Any], rules: Rules, topic: str, kind: str) -> None:
    sig = obj.get("sig")
    if sig is None:
        if rules.require_signature:
            raise _Reject("missing_signature", "a signature is required and there is none")
        return
    if rules.hmac_key is None:
        return  # no key configured: nothing to check it against (documented)
    problem = signature_problem(rules.hmac_key, topic, kind, obj, sig)
    if problem is not None:
        raise _Reject("bad_signature", problem)


def _number(obj: Mapping[str, Any], key: str) -> float:
    value = obj[key]
    # bool is an int subclass in Python; true is not a number of watts.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject("wrong_type", f"{key} must be a number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        raise _Reject("above_max", f"{key} is too large") from None
    if not math.isfinite(as_float):
        raise _Reject("not_finite", f"{key} is {value}")
    return as_float


def _text(obj: Mapping[str, Any], key: str, required: bool) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"{key} must be a string, got {type(value).__name__}")
    if required and not value:
        raise _Reject("missing_field", f"{key} must not be empty")
    if len(value) > MAX_TEXT:
        raise _Reject("above_max", f"{key} is longer than {MAX_TEXT} characters")
    return value


def _seq(obj: Mapping[str, Any]) -> int:
    value = obj["seq"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject("wrong_type", f"seq must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_SEQ:
        raise _Reject("bad_seq", f"seq {value} is not in 0..{MAX_SEQ}")
    return value


def _expiry(obj: Mapping[str, Any], issued_at: float, rules: Rules, needed: bool) -> float | None:
    has_ttl, has_abs = "ttl_s" in obj, "expires_at" in obj
    if has_ttl and has_abs:
        raise _Reject("conflicting_expiry", "give ttl_s or expires_at, not both")
    if not (has_ttl or has_abs):
        if needed:
            raise _Reject("missing_field", "one of ttl_s or expires_at is required")
        return None
    if has_ttl:
        ttl = _number(obj, "ttl_s")
        if ttl <= 0:
            raise _Reject("not_positive", f"ttl_s {ttl} must be > 0")
        expires_at = issued_at + ttl
    else:
        expires_at = _number(obj, "expires_at")
        if expires_at <= issued_at:
            raise _Reject("bad_expiry", f"expires_at {expires_at} is not after issued_at")
    if expires_at - issued_at > rules.max_ttl_s:
        raise _Reject(
            "ttl_too_long", f"lifetime {expires_at - issued_at:.0f} s > {rules.max_ttl_s:.0f} s"
        )
    return expires_at


def _times(obj: Mapping[str, Any], now_s: float, rules: Rules, needed: bool) -> tuple[float, Any]:
    issued_at = _number(obj, "issued_at")
    if issued_at <= 0:
        raise _Reject("not_positive", f"issued_at {issued_at} must be unix seconds")
    expires_at = _expiry(obj, issued_at, rules, needed)
    if issued_at > now_s + rules.max_clock_skew_s:
        raise _Reject(
            "from_the_future",
            f"issued_at is {issued_at - now_s:.1f} s ahead (skew allowed "
            f"{rules.max_clock_skew_s:.0f} s)",
        )
    if expires_at is not None and expires_at <= now_s:
        raise _Reject("expired", f"expired {now_s - expires_at:.1f} s before arrival")
    return issued_at, expires_at


def _who(obj: Any) -> tuple[str | None, int | None]:
    if not isinstance(obj, dict):
        return None, None
    sender, seq = obj.get("sender"), obj.get("seq")
    return (
        sender if isinstance(sender, str) else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


def decode_budget(
    raw: bytes, now_s: float, rules: Rules, *, topic: str, max_budget_w: float | None = None
) -> BudgetMessage | Rejected:
    """A budget published on `topic` (the signature covers it). `max_budget_w` overrides
    rules.max_budget_w (a group topic bounds the unscaled value)."""
    obj: Any = None
    try:
        obj = _parse(raw, BUDGET_FIELDS, ("budget_w", "seq", "issued_at", "sender"))
        _check_signature(obj, rules, topic, "budget")
        sender = _text(obj, "sender", required=True)
        seq = _seq(obj)
        budget_w = _number(obj, "budget_w")
        reason = _text(obj, "reason", required=False)
        if budget_w <= 0:
            raise _Reject("not_positive", f"budget_w {budget_w} must be > 0")
        limit = rules.max_budget_w if max_budget_w is None else max_budget_w
        if budget_w > limit:
            raise _Reject("above_max", f"budget_w {budget_w} > max_budget_w {limit}")
        issued_at, expires_at = _times(obj, now_s, rules, needed=True)
    except _Reject as r:
        return Rejected(r.reason, r.detail, *_who(obj))
    return BudgetMessage(
        budget_w, seq, issued_at, expires_at, sender, reason, hashlib.sha256(raw).hexdigest()
    )


def decode_price(raw: bytes, now_s: float, rules: Rules, *, topic: str) -> PriceMessage | Rejected:
    obj: Any = None
    try:
        obj = _parse(raw, PRICE_FIELDS, ("price_per_mwh", "seq", "issued_at", "sender"))
        _check_signature(obj, rules, topic, "price")
        sender = _text(obj, "sender", required=True)
        seq = _seq(obj)
        price = _number(obj, "price_per_mwh")  # may be negative: such prices happen
        reason = _text(obj, "reason", required=False)
        if abs(price) > MAX_ABS_PRICE_PER_MWH:
            raise _Reject("above_max", f"|price_per_mwh| {price} > {MAX_ABS_PRICE_PER_MWH}")
        issued_at, expires_at = _times(obj, now_s, rules, needed=False)
    except _Reject as r:
        return Rejected(r.reason, r.detail, *_who(obj))
    return PriceMessage(
        price, seq, issued_at, expires_at, sender, reason, hashlib.sha256(raw).hexdigest()
    )


@dataclass(frozen=True)
class SeqBook:
    """The last accepted (seq, digest) per (origin topic, sender).

    A sequence number must grow per sender on each topic. The same bytes again (a QoS 1
    redelivery, or the retained message after a reconnect) are a duplicate, not an attack.
    """

    last: Mapping[tuple[str, str], tuple[int, str]] = field(default_factory=dict)

    def check(self, origin: str, msg: Message) -> Rejected | Literal["new", "duplicate"]:
        """Say "new" (accept), "duplicate" (same bytes again: ignore) or reject a replay."""
        seen = self.last.get((origin, msg.sender))
        if seen is None or msg.seq > seen[0]:
            return "new"
        if msg.seq == seen[0] and msg.digest == seen[1]:
            return "duplicate"
        return Rejected(
            "replayed_seq",
            f"seq {msg.seq} is not above the last accepted {seen[0]} from this sender",
            msg.sender,
            msg.seq,
        )

    def accepted(self, origin: str, msg: Message) -> SeqBook:
        updated = dict(self.last)
        updated[(origin, msg.sender)] = (msg.seq, msg.digest)
        return replace(self, last=updated)

    def to_json(self) -> list[list[Any]]:
        return [[o, s, seq, d] for (o, s), (seq, d) in sorted(self.last.items())]

    @classmethod
    def from_json(cls, rows: Any) -> SeqBook:
        """Raises ValueError on anything but what to_json wrote."""
        if not isinstance(rows, list):
            raise ValueError("expected a list of [origin, sender, seq, digest]")
        last: dict[tuple[str, str], tuple[int, str]] = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4):
                raise ValueError(f"bad row {row!r}")
            origin, sender, seq, digest = row
            if not (
                isinstance(origin, str) and isinstance(sender, str) and isinstance(digest, str)
            ):
                raise ValueError(f"bad row {row!r}")
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise ValueError(f"bad seq in {row!r}")
            last[(origin, sender)] = (seq, digest)
        return cls(last=last)
