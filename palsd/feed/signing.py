"""HMAC signatures of feed messages: what is signed, and a verifier that cannot raise. Pure.

Rules of this file: the signature binds the message's fields, the MQTT topic it is published on
and its kind ("budget" or "price"), so a message signed for one host, group or kind is refused on
any other. The signed bytes (docs/mqtt.md, "Signing") are

    b"palsd-feed-v2\\n" + kind + b"\\n" + topic + b"\\n" + JCS(fields without "sig")

where JCS is the JSON Canonicalization Scheme (RFC 8785): keys sorted by UTF-16 code units, no
whitespace, strings with JSON's minimal escapes, numbers as ECMAScript writes them (`4000.0` is
`4000`, `1e-7` is `1e-7`), UTF-8. Libraries exist for most languages, and JavaScript's
`JSON.stringify` of an object with sorted keys already gives it. The line form cannot be
ambiguous: the kind is a fixed word and the JCS text holds no raw newline, so the last newline
ends the topic. `sig` is the lowercase hex HMAC-SHA256 of those bytes under the shared key.

`verify` is total: any value at all (not a string, non-ASCII, not hex, the wrong length, fields
that have no canonical form) is a plain False, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from json.encoder import encode_basestring
from typing import Any, Final

SCHEME: Final = b"palsd-feed-v2"
KINDS: Final = ("budget", "price")
SIG_HEX_LEN: Final = 64
_SIG = re.compile(r"[0-9a-fA-F]{64}")
_MAX_DEPTH = 16  # feed messages are flat; deeper nesting has no canonical form here


class NotCanonical(ValueError):
    """The fields have no canonical form (NaN, Infinity, a lone surrogate, deep nesting)."""


def _number(x: float) -> str:
    """ECMAScript Number::toString, which RFC 8785 uses for every number."""
    if not math.isfinite(x):
        raise NotCanonical(f"{x} is not a finite number")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + _number(-x)
    if x.is_integer() and x < 2**53:
        return str(int(x))  # the common case (watts, unix seconds), exactly as below, faster
    if 1e-4 <= x < 2**53:
        # repr writes these without an exponent, with the same shortest digits JavaScript uses
        return repr(x)
    # repr gives the shortest digits that round-trip; JavaScript picks the same digits.
    sign_, digits_t, exp = Decimal(repr(x)).as_tuple()
    digits = "".join(map(str, digits_t)).rstrip("0") or "0"
    assert isinstance(exp, int) and sign_ == 0
    k = len(digits)
    n = exp + len(digits_t)  # x = 0.digits * 10**n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def _string(s: str) -> str:
    # Python's minimal escaping (ensure_ascii=False) is RFC 8785's: \" \\ \b \f \n \r \t and
    # \u00xx (lowercase) for other control characters; everything else is written as itself.
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise NotCanonical("a string holds a lone surrogate (not Unicode text)") from None
    return str(encode_basestring(s))


def _jcs(value: Any, depth: int) -> str:
    if depth > _MAX_DEPTH:
        raise NotCanonical(f"nested deeper than {_MAX_DEPTH}")
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        try:
            return _number(float(value))  # JSON numbers are doubles to every other language
        except OverflowError:
            raise NotCanonical("an integer too large for a double") from None
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jcs(v, depth + 1) for v in value) + "]"
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise NotCanonical("an object key is not a string")
        for k in keys:
            _string(k)
        keys.sort(key=lambda k: k.encode("utf-16-be"))  # RFC 8785: UTF-16 code unit order
        return "{" + ",".join(_string(k) + ":" + _jcs(value[k], depth + 1) for k in keys) + "}"
    raise NotCanonical(f"a {type(value).__name__} is not a JSON value")


def _flat(body: Mapping[str, Any]) -> bytes | None:
    """The common case, fast: a flat object of ASCII keys and plain values, where the standard
    library's sorted compact JSON already is RFC 8785 once integral floats are written as
    integers. None: take the general path (also for anything it would refuse)."""
    plain: dict[str, Any] = {}
    for k, v in body.items():
        if not (isinstance(k, str) and k.isascii()):
            return None
        t = type(v)
        if t is float:
            if v.is_integer() and abs(v) < 2**53:
                v = int(v)
            elif not 1e-4 <= abs(v) < 2**53:
                return None  # NaN, infinities, exponent forms: the general path decides
            # else repr has no exponent and the same shortest digits as JavaScript
        elif t is int:
            if not -(2**53) < v < 2**53:
                return None
        elif not (t is str or t is bool or v is None):
            return None
        plain[k] = v
    try:
        text = json.dumps(
            plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return None


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """RFC 8785 bytes of every field but `sig`. Raises NotCanonical."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    fast = _flat(body)
    return fast if fast is not None else _jcs(body, 0).encode("utf-8")


def signing_input(topic: str, kind: str, fields: Mapping[str, Any]) -> bytes:
    """The exact bytes the HMAC covers. Raises NotCanonical (also for an unknown kind)."""
    if kind not in KINDS:
        raise NotCanonical(f"kind {kind!r} is not one of {KINDS}")
    try:
        topic_b = topic.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        raise NotCanonical("the topic is not Unicode text") from None
    if b"\n" in topic_b or not topic_b:
        raise NotCanonical("the topic is empty or holds a newline")
    return b"\n".join((SCHEME, kind.encode(), topic_b, canonical_json(fields)))


def sign(key: bytes, topic: str, kind: str, fields: Mapping[str, Any]) -> str:
    """Lowercase hex HMAC-SHA256 for `fields` published on `topic` as `kind`.
    Raises NotCanonical when the fields cannot be signed."""
    return hmac.new(key, signing_input(topic, kind, fields), hashlib.sha256).hexdigest()


def signed_message(key: bytes, topic: str, kind: str, fields: Mapping[str, Any]) -> bytes:
    """The payload to publish: the canonical fields with `sig` added (itself canonical JSON)."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    body["sig"] = sign(key, topic, kind, body)
    return _jcs(body, 0).encode("utf-8")


def signature_problem(
    key: bytes, topic: str, kind: str, fields: Mapping[str, Any], sig: object
) -> str | None:
    """None when `sig` is the right signature; otherwise what is wrong, for the operator.
    Never raises, whatever `sig` and `fields` hold."""
    if not isinstance(sig, str):
        return f"sig must be a hex string, got {type(sig).__name__}"
    if len(sig) != SIG_HEX_LEN or _SIG.fullmatch(sig) is None:
        return f"sig must be {SIG_HEX_LEN} hex digits"
    try:
        expected = sign(key, topic, kind, fields)
    except NotCanonical as err:
        return f"the fields cannot be signed: {err}"
    # Both ASCII by now: compare_digest raises TypeError on non-ASCII str (the poison message).
    if not hmac.compare_digest(expected, sig.lower()):
        return f"HMAC-SHA256 over {SCHEME.decode()} (kind, topic, fields) does not match"
    return None


def verify(key: bytes, topic: str, kind: str, fields: Mapping[str, Any], sig: object) -> bool:
    """True only for the right signature of these fields on this topic as this kind."""
    return signature_problem(key, topic, kind, fields, sig) is None
