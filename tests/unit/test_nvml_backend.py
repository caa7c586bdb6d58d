"""NvmlBackend against an autospec'd pynvml that answers like a real H100 80GB HBM3.

The fake is `create_autospec(pynvml)` with the real constants, exception classes and ctypes
structs put back, so a call with the wrong arity or a misspelt NVML function fails the test.
`make_fake_pynvml` is also used by test_dry_run_no_setter.py.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pynvml
import pytest

import palsd.sense.nvml as nvml_mod
from palsd.errors import (
    GpuError,
    GpuInvalidArgument,
    GpuLost,
    GpuNotSupported,
    GpuPermissionError,
    GpuUnavailable,
)
from palsd.sense.nvml import NvmlBackend, translate

# What a real H100 SXM5 reported (docs/hardware.md, shared/reference/nvml.md), in NVML's units.
H100_NAME = "NVIDIA H100 80GB HBM3"
H100_CONSTRAINTS_MW = (200_000, 700_000)
H100_DEFAULT_MW = 700_000

# Every NVML call that changes device state: the dry-run guard must see none of them.
MUTATING = re.compile(r"^nvml(?!EventSet)\w*?(Set|Reset|Clear|Create|Destroy|Modify|Remove)")


def mutating_names() -> list[str]:
    return [n for n in dir(pynvml) if MUTATING.match(n) and callable(getattr(pynvml, n))]


def field_value(value_mw: int, ret: int = pynvml.NVML_SUCCESS) -> Any:
    field = pynvml.c_nvmlFieldValue_t()
    field.fieldId = pynvml.NVML_FI_DEV_POWER_INSTANT
    field.nvmlReturn = ret
    field.value.uiVal = value_mw
    return field


def make_fake_pynvml(n_gpus: int = 2, power_mw: int = 119_500) -> Any:
    """An autospec'd pynvml whose reads answer like idle H100s. `state` on the fake holds the
    values each read returns, per GPU index, so a test can move them between ticks."""
    fake = mock.create_autospec(pynvml)
    for name in dir(pynvml):
        value = getattr(pynvml, name)
        if isinstance(value, type) or not callable(value):
            setattr(fake, name, value)  # constants, NVMLError classes, ctypes structs stay real
    handles = [SimpleNamespace(index=i) for i in range(n_gpus)]
    state = {
        i: {
            "power_mw": power_mw,
            "instant_mw": power_mw + 1_500,
            "energy_mj": 123_456_789_000 + i,
            "limit_mw": H100_DEFAULT_MW,
            "clock_mhz": 1980,
            "reasons": pynvml.nvmlClocksEventReasonNone,
        }
        for i in range(n_gpus)
    }
    fake.state = state
    fake.nvmlDeviceGetCount.return_value = n_gpus
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda i: handles[i]
    fake.nvmlDeviceGetName.return_value = H100_NAME
    fake.nvmlDeviceGetUUID.side_effect = lambda h: f"GPU-5a1e0000-0000-0000-0000-0000000{h.index}"
    fake.nvmlDeviceGetPowerManagementLimitConstraints.return_value = list(H100_CONSTRAINTS_MW)
    fake.nvmlDeviceGetPowerManagementDefaultLimit.return_value = H100_DEFAULT_MW
    fake.nvmlDeviceGetPowerManagementLimit.side_effect = lambda h: state[h.index]["limit_mw"]
    fake.nvmlDeviceGetEnforcedPowerLimit.side_effect = lambda h: state[h.index]["limit_mw"]
    fake.nvmlDeviceGetPowerUsage.side_effect = lambda h: state[h.index]["power_mw"]
    fake.nvmlDeviceGetFieldValues.side_effect = lambda h, ids: [
        field_value(state[h.index]["instant_mw"]) for _ in ids
    ]
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = lambda h: state[h.index]["energy_mj"]
    fake.nvmlDeviceGetClockInfo.side_effect = lambda h, kind: state[h.index]["clock_mhz"]
    fake.nvmlDeviceGetCurrentClocksEventReasons.side_effect = lambda h: state[h.index]["reasons"]
    return fake


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = make_fake_pynvml()
    monkeypatch.setattr(nvml_mod, "pynvml", fake)
    return fake


def test_discovery_finds_every_gpu_with_static_facts_in_watts(fake: Any) -> None:
    backend = NvmlBackend()
    obs = backend.read_all()  # read_all starts the backend on first use
    assert [g.index for g in obs] == [0, 1]
    g = obs[0]
    assert g.name == H100_NAME
    assert g.uuid.startswith("GPU-")
    assert (g.min_limit_w, g.max_limit_w, g.default_limit_w) == (200.0, 700.0, 700.0)
    fake.nvmlInit.assert_called_once_with()
    assert fake.nvmlDeviceGetHandleByIndex.call_args_list == [mock.call(0), mock.call(1)]


def test_discovery_honours_configured_indices(fake: Any) -> None:
    backend = NvmlBackend(indices=[1])
    backend.start()
    assert [g.index for g in backend.read_all()] == [1]


def test_discovery_rejects_an_index_that_does_not_exist(fake: Any) -> None:
    with pytest.raises(GpuUnavailable, match="GPU 5 is configured but only 2 GPUs exist"):
        NvmlBackend(indices=[0, 5]).start()


def test_discovery_decodes_bytes_names_from_older_bindings(fake: Any) -> None:
    fake.nvmlDeviceGetName.return_value = H100_NAME.encode()
    fake.nvmlDeviceGetUUID.side_effect = lambda h: b"GPU-abc"
    obs = NvmlBackend(indices=[0]).read_all()
    assert (obs[0].name, obs[0].uuid) == (H100_NAME, "GPU-abc")


def test_read_converts_milliwatts_and_millijoules(fake: Any) -> None:
    fake.state[0].update(
        power_mw=612_345, instant_mw=655_001, energy_mj=987_654_321, limit_mw=450_000
    )
    g = NvmlBackend(indices=[0]).read_all()[0]
    assert g.power_w == pytest.approx(612.345)
    assert g.power_instant_w == pytest.approx(655.001)
    assert g.energy_j == pytest.approx(987_654.321)
    assert g.power_limit_w == 450.0
    assert g.enforced_limit_w == 450.0
    assert g.sm_clock_mhz == 1980.0
    fake.nvmlDeviceGetClockInfo.assert_called_with(mock.ANY, pynvml.NVML_CLOCK_SM)


def test_instant_power_is_read_through_the_instant_field(fake: Any) -> None:
    NvmlBackend(indices=[0]).read_all()
    fake.nvmlDeviceGetFieldValues.assert_called_once_with(
        mock.ANY, [pynvml.NVML_FI_DEV_POWER_INSTANT]
    )


def test_instant_power_is_none_when_the_field_reports_an_error(fake: Any) -> None:
    fake.nvmlDeviceGetFieldValues.side_effect = lambda h, ids: [
        field_value(0, ret=pynvml.NVML_ERROR_NOT_SUPPORTED)
    ]
    g = NvmlBackend(indices=[0]).read_all()[0]
    assert g.power_instant_w is None
    assert g.power_w == pytest.approx(119.5)  # the other reads are unaffected


@pytest.mark.parametrize(
    ("function", "attribute"),
    [
        ("nvmlDeviceGetPowerUsage", "power_w"),
        ("nvmlDeviceGetFieldValues", "power_instant_w"),
        ("nvmlDeviceGetTotalEnergyConsumption", "energy_j"),
        ("nvmlDeviceGetEnforcedPowerLimit", "enforced_limit_w"),
        ("nvmlDeviceGetClockInfo", "sm_clock_mhz"),
    ],
)
def test_optional_read_failing_gives_none_not_an_error(
    fake: Any, function: str, attribute: str
) -> None:
    getattr(fake, function).side_effect = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    g = NvmlBackend(indices=[0]).read_all()[0]
    assert getattr(g, attribute) is None
    assert g.power_limit_w == 700.0


def test_clock_event_reasons_pass_the_bitmask_through_and_none_on_error(fake: Any) -> None:
    backend = NvmlBackend(indices=[0])
    backend.start()
    fake.state[0]["reasons"] = pynvml.nvmlClocksEventReasonSwPowerCap
    assert backend.clock_event_reasons(0) == pynvml.nvmlClocksEventReasonSwPowerCap
    fake.nvmlDeviceGetCurrentClocksEventReasons.side_effect = nvml_error(
        pynvml.NVML_ERROR_NOT_SUPPORTED
    )
    assert backend.clock_event_reasons(0) is None


def test_required_read_failing_raises_the_mapped_error(fake: Any) -> None:
    backend = NvmlBackend(indices=[0])
    backend.start()
    fake.nvmlDeviceGetPowerManagementLimit.side_effect = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(GpuLost, match=r"GPU 0: .*dmesg") as info:
        backend.read_all()
    assert isinstance(info.value.__cause__, pynvml.NVMLError)


# Each NVML error code palsd names, the palsd type it becomes, and words its advice must hold.
ERROR_TABLE = [
    (pynvml.NVML_ERROR_NO_PERMISSION, GpuPermissionError, "CAP_SYS_ADMIN"),
    (pynvml.NVML_ERROR_INVALID_ARGUMENT, GpuInvalidArgument, "constraints"),
    (pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupported, "does not support"),
    (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLost, "Xid"),
    (pynvml.NVML_ERROR_UNINITIALIZED, GpuUnavailable, "not initialised"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuUnavailable, "driver is not loaded"),
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuUnavailable, "libnvidia-ml.so"),
    (pynvml.NVML_ERROR_UNKNOWN, GpuError, "unexpected NVML error"),
]


@pytest.mark.parametrize(("code", "cls", "advice"), ERROR_TABLE)
def test_translate_maps_each_code_to_a_typed_error_with_advice(
    code: int, cls: type[GpuError], advice: str
) -> None:
    err = translate(nvml_error(code), "nvmlDeviceSetPowerManagementLimit", index=3)
    assert type(err) is cls
    assert err.index == 3
    assert advice in str(err)
    assert str(err).startswith("GPU 3: nvmlDeviceSetPowerManagementLimit: ")


@pytest.mark.parametrize(("code", "cls", "advice"), ERROR_TABLE)
def test_setter_errors_reach_the_caller_mapped(
    fake: Any, code: int, cls: type[GpuError], advice: str
) -> None:
    backend = NvmlBackend(indices=[0])
    backend.start()
    fake.nvmlDeviceSetPowerManagementLimit.side_effect = nvml_error(code)
    with pytest.raises(cls, match=re.escape(advice)):
        backend.set_power_limit_w(0, 300.0)


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "nvidia.ko"),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so"),
    ],
)
def test_start_without_a_driver_says_what_to_install(fake: Any, code: int, advice: str) -> None:
    fake.nvmlInit.side_effect = nvml_error(code)
    with pytest.raises(GpuUnavailable, match=re.escape(advice)) as info:
        NvmlBackend().start()
    assert info.value.index is None


def test_set_power_limit_converts_to_whole_milliwatts_rounding_down(fake: Any) -> None:
    backend = NvmlBackend(indices=[0, 1])
    backend.start()
    backend.set_power_limit_w(1, 412.3459)
    fake.nvmlDeviceSetPowerManagementLimit.assert_called_once_with(mock.ANY, 412_345)
    (handle, _), _ = fake.nvmlDeviceSetPowerManagementLimit.call_args
    assert handle.index == 1


def test_set_power_limit_on_an_uncontrolled_gpu_is_refused_before_nvml(fake: Any) -> None:
    backend = NvmlBackend(indices=[0])
    backend.start()
    with pytest.raises(GpuInvalidArgument, match="not a controlled GPU index: 1"):
        backend.set_power_limit_w(1, 300.0)
    fake.nvmlDeviceSetPowerManagementLimit.assert_not_called()


def test_reads_call_no_mutating_nvml_function(fake: Any) -> None:
    backend = NvmlBackend()
    for _ in range(3):
        backend.read_all()
        backend.clock_event_reasons(0)
    backend.close()
    names = mutating_names()
    assert "nvmlDeviceSetPowerManagementLimit_v2" in names
    assert "nvmlEventSetCreate" not in names
    called = [n for n in names if getattr(fake, n).called]
    assert called == []


def test_close_shuts_nvml_down_once_and_swallows_its_error(fake: Any) -> None:
    backend = NvmlBackend()
    backend.start()
    fake.nvmlShutdown.side_effect = nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
    backend.close()
    backend.close()
    fake.nvmlShutdown.assert_called_once_with()
