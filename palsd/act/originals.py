"""The ownership record: each GPU's and server's value from before palsd first changed it.

Written atomically (temp file, fsync, rename) before the first write to a GPU or server, so a
crash at any point leaves either the old record or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE_NAME = "originals.json"


@dataclass
class Originals:
    gpus: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> {uuid, limit_w}
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {url, batch_limit}

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".originals.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(originals.to_json(), fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
