"""Feed signatures: the documented worked example, what the signature binds, and a verifier that
answers False (never raises) for anything that is not the right signature."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsd.feed.signing import (
    NotCanonical,
    _flat,
    _jcs,
    canonical_json,
    sign,
    signature_problem,
    signed_message,
    signing_input,
    verify,
)

# The worked example in docs/mqtt.md ("Signing"); a publisher in any language must get this hex.
KEY = b"example-key-do-not-use"
TOPIC = "dc1/palsd/gpu-07/budget"
FIELDS: dict[str, Any] = {
    "budget_w": 4000,
    "issued_at": 1764320000,
    "reason": "grid peak",
    "sender": "fms-1",
    "seq": 1043,
    "ttl_s": 300,
}
EXAMPLE_SIG = "ce838c5074f3affbae41bd7ac5e79295cd8be4797bbf48650ccea3ac8a7ca6f1"


def test_worked_example_from_the_docs() -> None:
    assert signing_input(TOPIC, "budget", FIELDS) == (
        b"palsd-feed-v2\nbudget\ndc1/palsd/gpu-07/budget\n"
        b'{"budget_w":4000,"issued_at":1764320000,"reason":"grid peak","sender":"fms-1",'
        b'"seq":1043,"ttl_s":300}'
    )
    assert sign(KEY, TOPIC, "budget", FIELDS) == EXAMPLE_SIG
    published = json.loads(signed_message(KEY, TOPIC, "budget", FIELDS))
    assert published == {**FIELDS, "sig": EXAMPLE_SIG}


def test_numbers_are_written_as_ecmascript_does() -> None:
    # 4000.0 and 4000 are one number to every JSON reader, so they sign the same.
    assert sign(KEY, TOPIC, "budget", {**FIELDS, "budget_w": 4000.0}) == EXAMPLE_SIG
    cases = [
        (1.5e-7, "1.5e-7"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (0.1, "0.1"),
        (2.0**60, "1152921504606847000"),  # shortest digits, not the exact integer
        (9424172622184216.0, "9424172622184216"),
        (123.0, "123"),
        (0.00001, "0.00001"),
    ]
    for value, text in cases:
        assert canonical_json({"x": value}) == f'{{"x":{text}}}'.encode()
    assert canonical_json({"x": -0.0}) == b'{"x":0}'


@pytest.mark.parametrize(
    ("topic", "kind", "fields"),
    [
        ("dc1/palsd/gpu-08/budget", "budget", FIELDS),  # another host's topic
        ("dc1/palsd/row3/budget", "budget", FIELDS),  # a group's topic
        (TOPIC, "price", FIELDS),  # another kind
        (TOPIC, "budget", {**FIELDS, "budget_w": 4001}),  # a changed field
        (TOPIC, "budget", {**FIELDS, "extra": 1}),  # an added field
    ],
)
def test_signature_binds_topic_kind_and_every_field(
    topic: str, kind: str, fields: dict[str, Any]
) -> None:
    assert verify(KEY, TOPIC, "budget", FIELDS, EXAMPLE_SIG)
    assert not verify(KEY, topic, kind, fields, EXAMPLE_SIG)


@pytest.mark.parametrize(
    "sig",
    [
        "é",
        "é" * 64,
        EXAMPLE_SIG[:-1] + "é",
        EXAMPLE_SIG + "0",
        EXAMPLE_SIG[:-1],
        "",
        "z" * 64,
        " " + EXAMPLE_SIG[1:],
        "\udcff" * 64,
        None,
        5,
        4.5,
        True,
        [EXAMPLE_SIG],
        {"sig": EXAMPLE_SIG},
        EXAMPLE_SIG.encode(),
    ],
)
def test_verifier_is_total_on_any_sig_value(sig: object) -> None:
    assert verify(KEY, TOPIC, "budget", FIELDS, sig) is False
    assert isinstance(signature_problem(KEY, TOPIC, "budget", FIELDS, sig), str)


def test_uppercase_hex_is_the_same_signature() -> None:
    assert verify(KEY, TOPIC, "budget", FIELDS, EXAMPLE_SIG.upper())


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "fields",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"reason": "\ud800"},  # a lone surrogate: JSON can carry it, UTF-8 cannot
        {"\ud800": 1},
        {"x": 10**400},
        {"x": _nested(20)},
        {"x": object()},
    ],
)
def test_fields_without_a_canonical_form_cannot_sign_nor_verify(fields: dict[str, Any]) -> None:
    with pytest.raises(NotCanonical):
        sign(KEY, TOPIC, "budget", fields)
    assert verify(KEY, TOPIC, "budget", fields, EXAMPLE_SIG) is False


@pytest.mark.parametrize("topic", ["", "a\nb"])
def test_topic_with_newline_or_empty_is_refused(topic: str) -> None:
    with pytest.raises(NotCanonical):
        sign(KEY, topic, "budget", FIELDS)
    assert not verify(KEY, topic, "budget", FIELDS, EXAMPLE_SIG)


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_javascript_json_stringify_gives_the_same_canonical_form() -> None:
    # The claim in docs/mqtt.md: JSON.stringify of the object with sorted keys is the canonical
    # form, so a JavaScript publisher needs no library.
    fields = {
        "budget_w": 1234.5678,
        "issued_at": 1764320000.25,
        "reason": 'é "quoted" \\ \n\t\u0001 \u2028 \u007f /',
        "sender": "fms-ü",
        "seq": 9007199254740991,
        "ttl_s": 1e-7,
        "expires_at": 1e21,
    }
    script = (
        "const o=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "const s={};for(const k of Object.keys(o).sort())s[k]=o[k];"
        "process.stdout.write(JSON.stringify(s));"
    )
    out = subprocess.run(
        ["node", "-e", script], input=json.dumps(fields).encode(), capture_output=True, check=True
    )
    assert out.stdout == canonical_json(fields)


_flat_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["\ud800", "é\u2028", 2**53, 2.0**53, 1e-4, 9.99e-5, 0.5, -0.0, 1e16])
)


@settings(max_examples=1500, derandomize=True, database=None, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["budget_w", "seq", "issued_at", "sender", "reason", "é", "\ud800"])
        | st.text(max_size=4),
        _flat_values,
        max_size=7,
    )
)
def test_fast_path_writes_what_the_general_rfc_8785_path_writes(fields: dict[str, Any]) -> None:
    fields.pop("sig", None)  # never signed, so never canonicalised
    fast = _flat(fields)
    try:
        general: bytes | None = _jcs(fields, 0).encode("utf-8")
    except NotCanonical:
        general = None
    if fast is not None:
        assert fast == general
    assert (canonical_json(fields) if general is not None else None) == general
