"""GPU backend that drives `palsd sim-host` over its local HTTP API (see docs/simhost.md).

It stands where NVML stands, so it should cost what NVML costs, not what an HTTP stack does:
plain `http.client` over one kept-alive connection per thread (the actuator writes GPUs in
parallel from a pool), about a quarter of httpx's CPU per call. A call on a kept-alive
connection that the server closed meanwhile is sent once more on a fresh one; a limit write is
idempotent, so one repeat is safe.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import urlsplit

from palsd.core.types import GpuObservation
from palsd.errors import GpuError, GpuInvalidArgument, GpuUnavailable


def gpu_from_json(item: dict[str, Any]) -> GpuObservation:
    def opt(key: str) -> float | None:
        value = item.get(key)
        return None if value is None else float(value)

    return GpuObservation(
        index=int(item["index"]),
        name=str(item["name"]),
        uuid=str(item["uuid"]),
        power_w=opt("power_w"),
        power_instant_w=opt("power_instant_w"),
        energy_j=opt("energy_j"),
        power_limit_w=float(item["power_limit_w"]),
        enforced_limit_w=opt("enforced_limit_w"),
        min_limit_w=float(item["min_limit_w"]),
        max_limit_w=float(item["max_limit_w"]),
        default_limit_w=float(item["default_limit_w"]),
        sm_clock_mhz=opt("sm_clock_mhz"),
    )


class SimHostBackend:
    name = "sim"

    def __init__(
        self, base_url: str, indices: list[int] | None = None, timeout_s: float = 1.0
    ) -> None:
        self._base = base_url.rstrip("/")
        parts = urlsplit(self._base)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"simulated host URL must be http://host:port, not {base_url!r}")
        self._host, self._port, self._prefix = parts.hostname, parts.port or 80, parts.path
        self._indices = None if indices is None else set(indices)
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[http.client.HTTPConnection] = []

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):
            conn = self._conn()
            reused = conn.sock is not None
            try:
                conn.request(method, self._prefix + path, body, headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if attempt == 2 or not reused:
                    raise
            except (OSError, http.client.HTTPException):
                conn.close()
                raise
        raise AssertionError("unreachable")

    def read_all(self) -> list[GpuObservation]:
        try:
            status, body = self._call("GET", "/sim/v1/gpus")
            if status != 200:
                raise ValueError(f"answered {status}: {body[:200]!r}")
            gpus = [gpu_from_json(item) for item in json.loads(body)["gpus"]]
        except (OSError, http.client.HTTPException, KeyError, TypeError, ValueError) as err:
            raise GpuUnavailable(f"simulated host at {self._base} unreadable: {err}") from err
        if self._indices is not None:
            gpus = [g for g in gpus if g.index in self._indices]
        return gpus

    def set_power_limit_w(self, index: int, watts: float) -> None:
        body = json.dumps({"power_limit_w": watts}).encode()
        try:
            status, answer = self._call("PUT", f"/sim/v1/gpus/{index}/power-limit", body)
        except (OSError, http.client.HTTPException) as err:
            raise GpuUnavailable(f"simulated host unreachable: {err}", index) from err
        text = answer.decode("utf-8", errors="replace")
        if status == 400:
            try:
                reason = str(json.loads(answer).get("error", text))
            except (ValueError, AttributeError):
                reason = text
            raise GpuInvalidArgument(reason, index)
        if status >= 300:
            raise GpuError(f"simulated host answered {status}: {text}", index)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
