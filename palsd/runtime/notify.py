"""systemd service notification (sd_notify) over $NOTIFY_SOCKET; a no-op outside systemd."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = None
        if address:
            # An abstract socket is written with a leading '@'.
            self._address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *states: str) -> None:
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(states).encode(), self._address)
            except OSError:
                pass  # systemd gone; nothing useful to do

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def watchdog(self, status: str) -> None:
        self.send("WATCHDOG=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")
