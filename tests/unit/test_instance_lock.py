"""One instance per state directory, and an API socket path that is never someone else's file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from palsd.api.server import check_socket_path
from palsd.runtime.instance_lock import InstanceLock, InstanceLocked, StartRefused


def test_second_lock_on_the_same_state_dir_is_refused_and_names_the_holder(
    tmp_path: Path,
) -> None:
    with InstanceLock.acquire(tmp_path / "state"):
        with pytest.raises(InstanceLocked) as info:
            InstanceLock.acquire(tmp_path / "state")
        assert info.value.holder_pid == os.getpid()
        assert f"pid {os.getpid()}" in str(info.value)
    # Released: the next one gets it.
    InstanceLock.acquire(tmp_path / "state").release()


def test_lock_holds_on_a_state_dir_it_cannot_write(tmp_path: Path) -> None:
    # A directory fd is enough for flock; a missing pid file only makes the holder unknown.
    state = tmp_path / "state"
    state.mkdir()
    (state / "palsd.pid").mkdir()  # the pid file cannot be written
    with InstanceLock.acquire(state):
        with pytest.raises(InstanceLocked) as info:
            InstanceLock.acquire(state)
        assert info.value.holder_pid is None
        assert "pid is unknown" in str(info.value)


def test_free_path_and_stale_socket_are_accepted(tmp_path: Path) -> None:
    check_socket_path(tmp_path / "none.sock")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    check_socket_path(stale)
    assert stale.exists(), "checking touches nothing"


def test_live_socket_regular_file_and_link_are_refused_and_left_intact(tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen(1)
    regular = tmp_path / "notes.txt"
    regular.write_text("precious")
    link = tmp_path / "link.sock"
    link.symlink_to(regular)
    try:
        for path, fragment in (
            (live, "live listener"),
            (regular, "not a socket"),
            (link, "not a socket"),
        ):
            with pytest.raises(StartRefused, match=fragment):
                check_socket_path(path)
    finally:
        listener.close()
    assert regular.read_text() == "precious" and link.is_symlink() and live.exists()
