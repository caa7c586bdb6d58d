"""The one way palsd writes a state file: whole or not at all, and never through a symlink.

Every state file (the originals record, the MQTT sequence book, anything later) goes through
`write_atomic`. The temp file is created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW, a random
name) in the target's own directory, so another user who can write to that directory cannot
make palsd write through a link they planted; the file is fsync'd, renamed over the target and
the directory fsync'd, so a crash leaves the old content or the new, never half of either.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably. Raises OSError (disk full, read-only, ...) with the
    target unchanged and no temp file left behind."""
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _TEMP_FLAGS, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
