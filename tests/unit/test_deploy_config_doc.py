"""docs/configuration.md documents every key of the config schema, with default and unit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from palsd.config import PalsdConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def _generator() -> ModuleType:
    path = ROOT / "tools" / "gen_config_doc.py"
    spec = importlib.util.spec_from_file_location("gen_config_doc", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_doc"] = module
    spec.loader.exec_module(module)
    return module


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        out.append(key)
        ann = field.annotation
        inner = getattr(ann, "__args__", (None,))[0] if getattr(ann, "__origin__", None) else ann
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            is_list = inner is not ann
            out += _keys(inner, f"{key}[]." if is_list else f"{key}.")
    return out


def test_configuration_doc_is_generated_from_the_current_schema() -> None:
    gen = _generator()
    assert DOC.read_text() == gen.updated(DOC.read_text()), (
        "docs/configuration.md is out of date: run python tools/gen_config_doc.py"
    )


def test_every_key_has_a_meaning_and_no_meaning_is_stale() -> None:
    assert _generator().problems() == []


def test_every_schema_key_has_a_row_with_its_default() -> None:
    text = DOC.read_text()
    rows = {ln.split("`")[1]: ln for ln in text.splitlines() if ln.startswith("| `")}
    keys = _keys(PalsdConfig)
    assert len(keys) > 50
    for key in keys:
        assert key in rows, key
    assert "| `0.5` | s |" in rows["control.period_s"]
    assert "| `9101` | TCP port |" in rows["metrics.port"]
    assert "| W |" in rows["budget.default_w"]
