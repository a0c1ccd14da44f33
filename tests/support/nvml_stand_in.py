"""A stand-in for NVML (the ``pynvml`` module), named as such: NVML needs an NVIDIA GPU and
driver, which the machines these tests run on do not have. It answers the calls pluto makes
(``pluto.gpus``, ``pluto_sidecar.sysmetrics``) for a made-up set of devices, with a distinct
reading per device so a test can tell which device a key was read from; the code under test
is the same that runs against the real library. Names are pynvml's.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


NVML_TEMPERATURE_GPU = 0


@dataclass
class StandInDevice:
    uuid: str
    util: int
    mem_used: int = 1 << 30
    mem_total: int = 80 << 30
    power_mw: int = 300_000
    temperature: int = 60


@dataclass
class NvmlStandIn:
    """``devices`` as NVML would list them, index 0 first. ``uuid_bytes``: answer UUIDs as
    bytes, as nvidia-ml-py releases before 11.515 did. ``fail_init``: no driver."""

    devices: list[StandInDevice]
    uuid_bytes: bool = False
    fail_init: bool = False
    users: int = 0  # nvmlInit calls not yet matched by nvmlShutdown

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")
        self.users += 1

    def nvmlShutdown(self) -> None:
        self.users -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> StandInDevice:
        return self.devices[index]

    def nvmlDeviceGetUUID(self, device: StandInDevice) -> str | bytes:
        return device.uuid.encode() if self.uuid_bytes else device.uuid

    def nvmlDeviceGetUtilizationRates(self, device: StandInDevice) -> SimpleNamespace:
        return SimpleNamespace(gpu=device.util, memory=0)

    def nvmlDeviceGetMemoryInfo(self, device: StandInDevice) -> SimpleNamespace:
        return SimpleNamespace(used=device.mem_used, total=device.mem_total,
                               free=device.mem_total - device.mem_used)

    def nvmlDeviceGetPowerUsage(self, device: StandInDevice) -> int:
        return device.power_mw

    def nvmlDeviceGetTemperature(self, device: StandInDevice, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return device.temperature


def node_of(*uuids: str) -> NvmlStandIn:
    """A node whose devices have these UUIDs; device i reads ``util`` 10 * (i + 1)."""
    return NvmlStandIn([StandInDevice(uuid, util=10 * (i + 1)) for i, uuid in enumerate(uuids)])


def real_nvml_gpu_count() -> int:
    """How many GPUs the real NVML sees on this machine (0 without a driver): tests of the
    no-GPU path skip where there is one."""
    try:
        import pynvml  # type: ignore[import-untyped]

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
