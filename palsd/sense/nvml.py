"""NVML backend (nvidia-ml-py's `pynvml`). Every NVML error becomes a palsd GpuError here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pynvml

from palsd.core.types import GpuObservation
from palsd.errors import (
    GpuError,
    GpuInvalidArgument,
    GpuLost,
    GpuNotSupported,
    GpuPermissionError,
    GpuUnavailable,
)
from palsd.units import mj_to_j, mw_to_w, w_to_mw

T = TypeVar("T")

_ADVICE = {
    pynvml.NVML_ERROR_NO_PERMISSION: (
        GpuPermissionError,
        "no permission to change the power limit: run palsd as root or grant CAP_SYS_ADMIN",
    ),
    pynvml.NVML_ERROR_INVALID_ARGUMENT: (
        GpuInvalidArgument,
        "NVML rejected the value as out of range: check the GPU's limit constraints",
    ),
    pynvml.NVML_ERROR_NOT_SUPPORTED: (
        GpuNotSupported,
        "this GPU or driver does not support the call (power limits need Kepler or newer)",
    ),
    pynvml.NVML_ERROR_GPU_IS_LOST: (
        GpuLost,
        "the GPU fell off the bus: check dmesg for Xid errors; palsd will hold its limits",
    ),
    pynvml.NVML_ERROR_UNINITIALIZED: (GpuUnavailable, "NVML is not initialised"),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
        GpuUnavailable,
        "the NVIDIA driver is not loaded: is this a GPU host, and is nvidia.ko loaded?",
    ),
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        GpuUnavailable,
        "libnvidia-ml.so was not found: install the NVIDIA driver or mount it into the container",
    ),
}


def translate(err: pynvml.NVMLError, what: str, index: int | None = None) -> GpuError:
    cls, advice = _ADVICE.get(err.value, (GpuError, "unexpected NVML error"))
    return cls(f"{what}: {err} ({advice})", index)


def _call(what: str, fn: Callable[..., T], *args: Any, index: int | None = None) -> T:
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        raise translate(err, what, index) from err


class NvmlBackend:
    """Reads and writes power limits through NVML. Handles are looked up once at start."""

    name = "nvml"

    def __init__(self, indices: Sequence[int] | None = None) -> None:
        self._lock = threading.Lock()  # NVML is thread-safe, but keep one tick's reads together
        self._handles: dict[int, Any] = {}
        self._static: dict[int, tuple[str, str, float, float, float]] = {}
        self._wanted = list(indices) if indices is not None else None
        self._started = False
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        _call("nvmlInit", pynvml.nvmlInit)
        count = _call("nvmlDeviceGetCount", pynvml.nvmlDeviceGetCount)
        wanted = self._wanted if self._wanted is not None else list(range(count))
        for index in wanted:
            if not 0 <= index < count:
                raise GpuUnavailable(f"GPU {index} is configured but only {count} GPUs exist")
            handle = _call("nvmlDeviceGetHandleByIndex", pynvml.nvmlDeviceGetHandleByIndex, index)
            name = _call("nvmlDeviceGetName", pynvml.nvmlDeviceGetName, handle, index=index)
            uuid = _call("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, handle, index=index)
            lo_mw, hi_mw = _call(
                "nvmlDeviceGetPowerManagementLimitConstraints",
                pynvml.nvmlDeviceGetPowerManagementLimitConstraints,
                handle,
                index=index,
            )
            default_mw = _call(
                "nvmlDeviceGetPowerManagementDefaultLimit",
                pynvml.nvmlDeviceGetPowerManagementDefaultLimit,
                handle,
                index=index,
            )
            self._handles[index] = handle
            self._static[index] = (
                name if isinstance(name, str) else name.decode(),
                uuid if isinstance(uuid, str) else uuid.decode(),
                mw_to_w(lo_mw),
                mw_to_w(hi_mw),
                mw_to_w(default_mw),
            )
        self._started = True

    def _optional(self, fn: Callable[[], T]) -> T | None:
        # "None means the read failed": an optional reading never fails the whole tick.
        try:
            return fn()
        except pynvml.NVMLError:
            return None

    def _instant_mw(self, handle: Any) -> float | None:
        values = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        field = values[0]
        if getattr(field, "nvmlReturn", 0) != pynvml.NVML_SUCCESS:
            return None
        return float(field.value.uiVal)

    def read(self, index: int) -> GpuObservation:
        handle = self._handles[index]
        name, uuid, lo_w, hi_w, default_w = self._static[index]
        limit_mw = _call(
            "nvmlDeviceGetPowerManagementLimit",
            pynvml.nvmlDeviceGetPowerManagementLimit,
            handle,
            index=index,
        )
        power = self._optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        instant = self._optional(lambda: self._instant_mw(handle))
        energy = self._optional(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        enforced = self._optional(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        clock = self._optional(lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        return GpuObservation(
            index=index,
            name=name,
            uuid=uuid,
            power_w=None if power is None else mw_to_w(power),
            power_instant_w=None if instant is None else mw_to_w(instant),
            energy_j=None if energy is None else mj_to_j(energy),
            power_limit_w=mw_to_w(limit_mw),
            enforced_limit_w=None if enforced is None else mw_to_w(enforced),
            min_limit_w=lo_w,
            max_limit_w=hi_w,
            default_limit_w=default_w,
            sm_clock_mhz=None if clock is None else float(clock),
        )

    def read_all(self) -> list[GpuObservation]:
        if not self._started:
            self.start()
        with self._lock:
            if len(self._handles) == 1:
                return [self.read(i) for i in self._handles]
            # One GPU's reads cost ~4 ms on an H100 (the energy counter dominates): read the
            # GPUs side by side so a tick costs one GPU's reads, not the sum over eight.
            return list(self._pool().map(self.read, self._handles))

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=len(self._handles), thread_name_prefix="nvml-read"
            )
        return self._executor

    def clock_event_reasons(self, index: int) -> int | None:
        handle = self._handles[index]
        return self._optional(lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if index not in self._handles:
            raise GpuInvalidArgument(f"not a controlled GPU index: {index}", index)
        _call(
            "nvmlDeviceSetPowerManagementLimit",
            pynvml.nvmlDeviceSetPowerManagementLimit,
            self._handles[index],
            w_to_mw(watts),
            index=index,
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._started:
            self._started = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
