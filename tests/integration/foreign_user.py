"""Run palsd's own code as another user, wherever the checkout lives.

A checkout under a 0700 directory (root's home, say) cannot be read by uid 65534, and neither can
the virtualenv or the interpreter inside it. So the test copies what palsd needs at run time (the
`palsd` package and the distributions its base dependencies pull in, nothing from the dev or sim
extras) into a world-readable directory, and finds an interpreter of the same minor version that
the other user can execute. If there is none, the caller skips with the reason this module gives.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import palsd

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@dataclass(frozen=True)
class ForeignRuntime:
    python: str
    pythonpath: Path

    def command(self, module: str, *args: str) -> list[str]:
        return [*AS_NOBODY, self.python, "-m", module, *args]

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.pythonpath)}


def _requirement_name(spec: str) -> str | None:
    if ";" in spec and "extra ==" in spec.split(";", 1)[1]:
        return None  # an optional extra: not needed at run time
    match = re.match(r"[A-Za-z0-9_.\-]+", spec)
    return match.group(0) if match else None


def _closure(root: str) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded dependency (another platform or Python)
        seen[key] = dist
        todo.extend(n for n in map(_requirement_name, dist.requires or []) if n)
    return list(seen.values())


def _copy_runtime(dest: Path) -> None:
    shutil.copytree(Path(palsd.__file__).parent, dest / "palsd")
    for dist in _closure("palsd"):
        if dist.metadata["Name"].lower() == "palsd":
            continue
        for file in dist.files or []:
            src = Path(str(dist.locate_file(file))).resolve()
            if not src.is_file() or ".." in file.parts or file.parts[0].endswith(".dist-info"):
                continue
            target = dest / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _runs_as_nobody(python: str) -> bool:
    probe = subprocess.run(
        [*AS_NOBODY, python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return probe.returncode == 0 and probe.stdout.strip() == str(tuple(sys.version_info[:2]))


def _interpreter() -> str | None:
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [
        str(Path(sys.executable).resolve()),
        f"/usr/bin/{minor}",
        f"/usr/local/bin/{minor}",
    ]
    return next((c for c in candidates if Path(c).exists() and _runs_as_nobody(c)), None)


def unavailable_reason() -> str | None:
    """Why a test cannot run code as uid 65534 here, or None when it can."""
    import os

    if os.geteuid() != 0:
        return "switching to uid 65534 needs root"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed"
    if _interpreter() is None:
        return (
            f"no python{sys.version_info[0]}.{sys.version_info[1]} that uid 65534 may execute "
            f"({Path(sys.executable).resolve()} is not reachable by it and /usr/bin has none)"
        )
    return None


@contextmanager
def foreign_runtime() -> Iterator[ForeignRuntime]:
    """A copy of palsd and its run-time dependencies that uid 65534 can import."""
    python = _interpreter()
    assert python is not None, unavailable_reason()
    root = Path(tempfile.mkdtemp(prefix="palsd-foreign-", dir="/tmp"))
    try:
        _copy_runtime(root / "lib")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield ForeignRuntime(python=python, pythonpath=root / "lib")
    finally:
        shutil.rmtree(root, ignore_errors=True)
