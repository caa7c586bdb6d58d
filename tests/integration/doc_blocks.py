"""The shell blocks of docs/vllm.md that tests run as written: each fenced block right after a
`<!-- tested: NAME ... -->` line. Only the paths, the port and the model are swapped for the
test's own, through `substitute`, so what runs is what an operator copies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm.md"
_BLOCK = re.compile(r"<!-- tested: ([a-z0-9-]+)[^>]*-->\n```sh\n(.*?)\n```", re.DOTALL)


def blocks(doc: Path = DOC) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in _BLOCK.finditer(doc.read_text(encoding="utf-8")):
        assert m.group(1) not in found, f"two blocks named {m.group(1)!r} in {doc}"
        found[m.group(1)] = m.group(2)
    return found


def block(name: str) -> str:
    got = blocks()
    assert name in got, f"{DOC} has no block marked `<!-- tested: {name} -->` (has {sorted(got)})"
    return got[name]


def substitute(text: str, swaps: Mapping[str, str]) -> str:
    """Each key replaced by its value, longest key first (so `~/palsd-dist` is not read as
    `~/palsd` + `-dist`); every key must occur, or the doc changed under the test."""
    for old in sorted(swaps, key=len, reverse=True):
        assert old in text, f"{old!r} no longer in the block:\n{text}"
        text = text.replace(old, swaps[old])
    return text
