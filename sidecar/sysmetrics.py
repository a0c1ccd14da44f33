"""System metrics of the pod, sampled by the sidecar and logged to the run under ``sys/``.

One :class:`SystemSampler` per sidecar. Each :meth:`SystemSampler.sample` is a handful of
``/proc`` reads (well under a millisecond without GPUs) plus a few NVML calls per GPU, so it can
run every few seconds on the sidecar's event loop thread or in an executor.

What "the pod" means here, and why:

* **network** is exact: all containers of a pod share one network namespace, so the sum over
  non-loopback interfaces is the pod's traffic.
* **CPU and memory** come from psutil, i.e. ``/proc/stat`` and ``/proc/meminfo``; inside a
  container those describe the *node* unless the node runs lxcfs. For a training pod that owns
  its node (the usual multi-node GPU case) that is what one wants to see anyway.
* **disk** is the filesystem holding the spool directory (the emptyDir volume), which is what
  fills up when the server is unreachable.
* **GPUs** are read through NVML when the library loads and sees at least one device. The
  sidecar container sees the GPUs that its container runtime exposes to it (the operator asks
  for all of the node's: ``NVIDIA_VISIBLE_DEVICES=all``), not automatically the training
  container's. The ranks tell the sidecar the UUIDs of theirs (``pluto.gpus``, NODE frame) and
  :meth:`SystemSampler.restrict_gpus` then keeps those only, labelled by their position in
  the ranks' list (the index the training code uses), so that two pods on one node do not
  both report every GPU. Until then the sampler reports every GPU it sees, under its NVML
  index; the sidecar decides what to ask for (``pluto_sidecar.pod_gpus``).

Nothing here is allowed to break the sidecar: a machine without a GPU or driver produces no
GPU keys and at most one DEBUG line; a reading that fails is left out of that sample (logged
once at DEBUG) and never raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psutil

from pluto.gpus import uuid_text

__all__ = ["SystemSampler"]

log = logging.getLogger("pluto.sidecar.sysmetrics")

_T = TypeVar("_T")

# psutil's own definition of "busy": everything but idle and iowait. guest and guest_nice are
# already counted inside user and nice on Linux, so they are left out of the total.
_NOT_BUSY = ("idle", "iowait")
_DOUBLE_COUNTED = ("guest", "guest_nice")


class _CpuTimes(NamedTuple):
    busy: float
    total: float


class _Previous(NamedTuple):
    at: float  # time.monotonic()
    cpu: _CpuTimes | None
    net: dict[str, tuple[int, int]] | None  # nic -> (bytes_recv, bytes_sent)


def _cpu_times() -> _CpuTimes:
    times = psutil.cpu_times()._asdict()
    total = sum(times.values()) - sum(times.get(name, 0.0) for name in _DOUBLE_COUNTED)
    busy = total - sum(times.get(name, 0.0) for name in _NOT_BUSY)
    return _CpuTimes(busy=busy, total=total)


class _Gpu:
    """One NVML device: its handle, UUID (None if NVML would not say) and the readings it
    turned out not to support."""

    def __init__(self, index: int, handle: object, uuid: str | None) -> None:
        self.index = index
        self.handle = handle
        self.uuid = uuid
        self.unsupported: set[str] = set()


class SystemSampler:
    """Samples CPU, memory, network, spool disk and GPUs; see the module docstring.

    ``sample()`` returns a flat ``{key: value}`` dict ready to be logged as one step. Values
    that are rates over the time since the previous ``sample()`` call (``sys/cpu_percent``,
    ``sys/net_rx_bytes_per_s``, ``sys/net_tx_bytes_per_s``) are absent from the first sample
    (and ``sys/cpu_percent`` from a sample taken within ~10 ms, one kernel accounting tick, of
    the previous one).
    Not thread-safe: call it from one thread at a time.
    """

    def __init__(self, spool_dir: Path, *, gpus: bool = True, nvml: Any = None) -> None:
        """``nvml``: the NVML binding to use instead of importing ``pynvml`` (tests give a
        stand-in, as NVML needs an NVIDIA GPU and driver)."""
        self.spool_dir = Path(spool_dir)
        self._previous: _Previous | None = None
        self._loopback: set[str] = set()
        self._known_nics: set[str] = set()
        self._failed: set[str] = set()  # readings already reported as failing (log once)
        self._cpu_count = float(psutil.cpu_count(logical=True) or os.cpu_count() or 0)
        self._nvml: Any = None  # the pynvml module while NVML is initialised
        self._devices: list[_Gpu] = []  # every device NVML lists here
        self._gpus: list[tuple[int, _Gpu]] = []  # (label, device) of those sampled
        self._restricted_to: tuple[str, ...] | None = None
        if gpus:
            self._init_nvml(nvml)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Shut NVML down (if it was started). Idempotent; ``sample()`` afterwards has no GPUs."""
        nvml, self._nvml = self._nvml, None
        self._devices, self._gpus = [], []
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:  # a failing shutdown must not fail the sidecar's shutdown
                log.debug("nvmlShutdown failed", exc_info=True)

    def __enter__(self) -> SystemSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def gpu_count(self) -> int:
        """How many GPUs are sampled (0 when NVML is unavailable or sees none)."""
        return len(self._gpus)

    def restrict_gpus(self, uuids: Sequence[str] | None) -> list[str]:
        """Sample only the GPUs with these UUIDs (those of the training containers), each
        labelled ``sys/gpu/<its position in uuids>/``; None: every GPU NVML lists, labelled
        with its NVML index (as at the start). Returns those of ``uuids`` that NVML does not
        list here (their keys are left out). Calling again with the same UUIDs changes
        nothing."""
        wanted = None if uuids is None else tuple(uuids)
        by_uuid = {gpu.uuid: gpu for gpu in self._devices if gpu.uuid is not None}
        if wanted != self._restricted_to:
            self._restricted_to = wanted
            self._gpus = ([(gpu.index, gpu) for gpu in self._devices] if wanted is None else
                          [(label, by_uuid[uuid]) for label, uuid in enumerate(wanted)
                           if uuid in by_uuid])
        return [uuid for uuid in wanted or () if uuid not in by_uuid]

    # -- sampling ----------------------------------------------------------------------

    def sample(self) -> dict[str, float]:
        """One reading of everything; never raises."""
        out: dict[str, float] = {}
        now = time.monotonic()
        previous = self._previous
        elapsed = now - previous.at if previous is not None else 0.0

        cpu = self._read("cpu", _cpu_times)
        if cpu is not None and previous is not None and previous.cpu is not None:
            d_total = cpu.total - previous.cpu.total
            if d_total > 0:
                d_busy = cpu.busy - previous.cpu.busy
                out["sys/cpu_percent"] = round(min(100.0, max(0.0, 100.0 * d_busy / d_total)), 2)
            else:
                # Called again within one CPU accounting tick (~10 ms): nothing to divide by.
                # Keep the older baseline so the next sample measures over the longer window.
                cpu = previous.cpu
        if self._cpu_count:
            out["sys/cpu_count"] = self._cpu_count

        mem = self._read("memory", psutil.virtual_memory)
        if mem is not None:
            out["sys/mem_used_bytes"] = float(mem.used)
            out["sys/mem_percent"] = float(mem.percent)

        net = self._read("network", self._net_counters)
        if net is not None and previous is not None and previous.net is not None and elapsed > 0:
            rx = tx = 0
            for nic, (recv, sent) in net.items():
                before = previous.net.get(nic)
                if before is None:
                    continue  # appeared since the last sample: no baseline yet
                # A counter that went backwards was reset (interface recreated): count nothing.
                rx += max(0, recv - before[0])
                tx += max(0, sent - before[1])
            out["sys/net_rx_bytes_per_s"] = rx / elapsed
            out["sys/net_tx_bytes_per_s"] = tx / elapsed

        disk = self._read("spool disk", lambda: psutil.disk_usage(str(self.spool_dir)))
        if disk is not None:
            out["sys/spool_disk_used_bytes"] = float(disk.used)
            out["sys/spool_disk_free_bytes"] = float(disk.free)
            out["sys/spool_disk_percent"] = float(disk.percent)

        for label, gpu in self._gpus:
            self._sample_gpu(label, gpu, out)

        self._previous = _Previous(at=now, cpu=cpu, net=net)
        return out

    # -- internals ---------------------------------------------------------------------

    def _read(self, what: str, read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except Exception as exc:
            if what not in self._failed:
                self._failed.add(what)
                log.debug("sys metrics: cannot read %s (%s); left out", what, exc)
            return None

    def _net_counters(self) -> dict[str, tuple[int, int]]:
        counters = psutil.net_io_counters(pernic=True)
        if not set(counters) <= self._known_nics:
            self._refresh_loopback(counters)
        return {
            nic: (c.bytes_recv, c.bytes_sent)
            for nic, c in counters.items()
            if nic not in self._loopback
        }

    def _refresh_loopback(self, counters: dict[str, Any]) -> None:
        """Learn which interfaces are loopback; only when an unseen interface shows up."""
        try:
            stats = psutil.net_if_stats()
        except Exception:
            stats = {}
        for nic in counters:
            flags = getattr(stats.get(nic), "flags", "")
            if "loopback" in flags.split(",") or (not flags and nic == "lo"):
                self._loopback.add(nic)
        self._known_nics = set(counters)

    def _init_nvml(self, pynvml: Any) -> None:
        if pynvml is None:
            try:
                import pynvml  # type: ignore[import-untyped,no-redef]  # ships no stubs
            except ImportError:
                log.debug("sys metrics: nvidia-ml-py not installed; no GPU metrics")
                return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
            log.debug("sys metrics: NVML unavailable (%s); no GPU metrics", exc)
            return
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            gpus = [_device(pynvml, i) for i in range(count)]
        except Exception as exc:
            count, gpus = 0, []
            log.debug("sys metrics: NVML cannot list devices (%s); no GPU metrics", exc)
        if not gpus:
            if count == 0:
                log.debug("sys metrics: NVML sees no GPU; no GPU metrics")
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            return
        self._nvml = pynvml
        self._devices = gpus
        self._gpus = [(gpu.index, gpu) for gpu in gpus]

    def _sample_gpu(self, label: int, gpu: _Gpu, out: dict[str, float]) -> None:
        nvml = self._nvml
        prefix = f"sys/gpu/{label}/"

        def utilization() -> None:
            out[prefix + "util_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(gpu.handle).gpu)

        def memory() -> None:
            info = nvml.nvmlDeviceGetMemoryInfo(gpu.handle)
            out[prefix + "mem_used_bytes"] = float(info.used)
            if info.total:
                out[prefix + "mem_percent"] = round(100.0 * float(info.used) / float(info.total), 2)

        def power() -> None:  # NVML reports milliwatts
            out[prefix + "power_watts"] = float(nvml.nvmlDeviceGetPowerUsage(gpu.handle)) / 1000.0

        def temperature() -> None:
            value = nvml.nvmlDeviceGetTemperature(gpu.handle, nvml.NVML_TEMPERATURE_GPU)
            out[prefix + "temperature_c"] = float(value)

        readings: dict[str, Callable[[], None]] = {
            "util": utilization,
            "memory": memory,
            "power": power,
            "temperature": temperature,
        }
        for name, read in readings.items():
            if name in gpu.unsupported:
                continue
            try:
                read()
            except Exception as exc:
                # Not supported on this board (e.g. power on some SKUs): stop asking.
                if isinstance(exc, nvml.NVMLError_NotSupported):
                    gpu.unsupported.add(name)
                what = f"gpu {gpu.index} {name}"
                if what not in self._failed:
                    self._failed.add(what)
                    log.debug("sys metrics: cannot read %s (%s); left out", what, exc)


def _device(nvml: Any, index: int) -> _Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid: str | None
    try:
        uuid = uuid_text(nvml.nvmlDeviceGetUUID(handle))
    except Exception:  # cannot be matched with what the ranks tell; sampled until they do
        uuid = None
    return _Gpu(index, handle, uuid)
