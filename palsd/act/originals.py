"""The ownership record: each GPU's and server's value from before palsd first changed it.

Written through palsd.atomicfile.write_atomic (exclusive temp file, fsync, rename, fsync of the
directory) before the first write to a GPU or server, so a crash at any point leaves either the
old record or the new one, never half of one. A save either returns with the record on disk or
raises OSError; callers change nothing until it has returned.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palsd.atomicfile import write_atomic

STATE_FILE_NAME = "originals.json"


@dataclass
class Originals:
    gpus: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> {uuid, limit_w}
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {url, batch_limit}

    def copy(self) -> Originals:
        return Originals(gpus=copy.deepcopy(self.gpus), servers=copy.deepcopy(self.servers))

    def empty(self) -> bool:
        return not self.gpus and not self.servers

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "gpus": {str(i): v for i, v in sorted(self.gpus.items())},
            "servers": self.servers,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Originals:
        if data.get("version") != 1:
            raise ValueError(f"unknown originals record version {data.get('version')!r}")
        gpus = {int(k): dict(v) for k, v in data.get("gpus", {}).items()}
        for index, entry in gpus.items():
            float(entry["limit_w"])  # fail loudly on a corrupt record, not during restore
            entry.setdefault("uuid", "")
            gpus[index] = entry
        return cls(gpus=gpus, servers={str(k): dict(v) for k, v in data.get("servers", {}).items()})


class OriginalsStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / STATE_FILE_NAME

    def load(self) -> Originals | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return Originals.from_json(json.loads(text))

    def save(self, originals: Originals) -> None:
        """Durably replace the record; raises OSError (disk full, read-only) with the old
        record intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(originals.to_json(), indent=1, sort_keys=True).encode()
        write_atomic(self.path, data)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
