"""systemd service notification (sd_notify) over $NOTIFY_SOCKET; a no-op outside systemd.

Readiness and the watchdog are both fed by completed ticks only (`tick_completed`): a daemon
whose tick is wedged, or fails every time, stops feeding the watchdog and systemd restarts it
(ExecStopPost restores the limits)."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = None
        self._ready = False
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

    def tick_completed(self, status: str) -> None:
        """The first completed tick says READY=1; every later one feeds the watchdog."""
        if self._ready:
            self.watchdog(status)
        else:
            self._ready = True
            self.ready(status)
