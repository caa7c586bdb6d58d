"""One palsd per state directory: an exclusive flock taken before anything is touched.

The rules of this file:
- The lock is `flock(LOCK_EX | LOCK_NB)` on the state directory itself (opened read-only), so it
  also works on a read-only or full state directory, and the kernel drops it when the holder
  dies, SIGKILL included: there is never a stale lock to clean up.
- The holder writes its pid to `palsd.pid` beside the record, best effort, so a refused second
  instance can name it; the pid is a hint for the operator, never what decides.
- `palsd run` and `palsd restore` both take it: a second daemon, or a restore under a live daemon,
  refuses with one line and changes nothing.
- `palsd run` also refuses an `api.socket` path that is not palsd's own stale socket (see
  palsd.api.server.check_socket_path), before it touches anything.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

PID_FILE_NAME = "palsd.pid"


class StartRefused(Exception):
    """palsd must not start (or restore): another instance, or a path that is not its own."""


class InstanceLocked(StartRefused):
    def __init__(self, state_dir: Path, holder_pid: int | None) -> None:
        self.state_dir = state_dir
        self.holder_pid = holder_pid
        holder = f"pid {holder_pid}" if holder_pid is not None else "a process whose pid is unknown"
        super().__init__(
            f"another palsd ({holder}) holds the state directory {state_dir}; "
            "stop it first (systemctl stop palsd)"
        )


class InstanceLock:
    """Held for the life of the process (or until release)."""

    def __init__(self, state_dir: Path, fd: int) -> None:
        self.state_dir = state_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> InstanceLock:
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise StartRefused(
                f"cannot open the state directory {state_dir}: {err.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceLocked(state_dir, _read_pid(state_dir)) from None
        except OSError as err:
            os.close(fd)
            raise StartRefused(f"cannot lock the state directory {state_dir}: {err}") from None
        _write_pid(state_dir)
        return cls(state_dir, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / PID_FILE_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _write_pid(state_dir: Path) -> None:
    # Best effort: a read-only or full state directory must not stop palsd from starting (it
    # then reports the record problem and writes nothing); the lock itself is what protects.
    try:
        fd = os.open(
            state_dir / PID_FILE_NAME,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
        )
    except OSError:
        return
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def claim(command: str, state_dir: Path, socket_path: Path | None = None) -> InstanceLock | None:
    """Take the lock (and, for `palsd run`, check the API socket path); on refusal print one
    line naming the problem and return None: the caller exits 2 having changed nothing."""
    try:
        lock = InstanceLock.acquire(state_dir)
    except StartRefused as err:
        print(f"palsd {command}: {err}", file=sys.stderr)
        return None
    if socket_path is not None:
        from palsd.api.server import check_socket_path  # only `palsd run` serves the API

        try:
            check_socket_path(socket_path)
        except StartRefused as err:
            lock.release()
            print(f"palsd {command}: {err}", file=sys.stderr)
            return None
    return lock
