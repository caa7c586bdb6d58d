"""GPU backend that drives `palsd sim-host` over its local HTTP API (see docs/simhost.md)."""

from __future__ import annotations

from typing import Any

import httpx

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
        self._indices = None if indices is None else set(indices)
        self._client = httpx.Client(timeout=timeout_s)

    def read_all(self) -> list[GpuObservation]:
        try:
            resp = self._client.get(f"{self._base}/sim/v1/gpus")
            resp.raise_for_status()
            items = resp.json()["gpus"]
            gpus = [gpu_from_json(item) for item in items]
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as err:
            raise GpuUnavailable(f"simulated host at {self._base} unreadable: {err}") from err
        if self._indices is not None:
            gpus = [g for g in gpus if g.index in self._indices]
        return gpus

    def set_power_limit_w(self, index: int, watts: float) -> None:
        try:
            resp = self._client.put(
                f"{self._base}/sim/v1/gpus/{index}/power-limit", json={"power_limit_w": watts}
            )
        except httpx.HTTPError as err:
            raise GpuUnavailable(f"simulated host unreachable: {err}", index) from err
        if resp.status_code == 400:
            raise GpuInvalidArgument(resp.json().get("error", resp.text), index)
        if resp.status_code >= 300:
            raise GpuError(f"simulated host answered {resp.status_code}: {resp.text}", index)

    def close(self) -> None:
        self._client.close()
