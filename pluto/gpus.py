"""The GPUs this process's container can use, by UUID, as NVML lists them.

A rank tells its sidecar (in the NODE frame) so that the sidecar reports this pod's GPUs and
not every GPU of the node: the operator gives the sidecar ``NVIDIA_VISIBLE_DEVICES=all``
because it cannot know at admission which GPUs the device plugin will hand the training
container, and two training pods sharing a node would otherwise both report all of them.

NVML inside a container lists only the devices the container runtime gave it, in the
container's own order (index 0 first), so the position of a UUID in the list is the index the
training code sees. Finding them never fails the training script: no NVML library, no driver,
no GPU or an NVML error all mean "no GPUs known" (an empty list), and the sidecar then keeps
reporting what it sees itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["GpuLookup", "container_gpu_uuids"]


def container_gpu_uuids(nvml: Any = None) -> list[str]:
    """UUIDs of the GPUs NVML lists for this process, in index order; ``[]`` when there are
    none or NVML cannot tell. ``nvml`` is the ``pynvml`` module (imported when not given)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-untyped,no-redef]  # ships no stubs
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: no GPU here
        return []
    try:
        return [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)))
                for index in range(int(nvml.nvmlDeviceGetCount()))]
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()  # NVML counts its users: the trainer's own use goes on


def _text(uuid: str | bytes) -> str:
    # nvidia-ml-py answers str; releases before 11.515 answered bytes.
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


class GpuLookup:
    """:func:`container_gpu_uuids` in a daemon thread, started at once: NVML's start can take
    a good part of a second on a node with many GPUs, which ``pluto.init()`` does not wait
    for. :meth:`result` is None until the answer is there."""

    def __init__(self, find: Callable[[], list[str]] = container_gpu_uuids) -> None:
        self._find = find
        self._uuids: list[str] | None = None
        self._thread = threading.Thread(target=self._run, name="pluto-gpus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            uuids = list(self._find())
        except Exception:  # a lookup that breaks means no GPUs known, never a crash
            uuids = []
        self._uuids = uuids

    def result(self) -> list[str] | None:
        return self._uuids

    def wait(self, timeout: float | None = None) -> list[str] | None:
        self._thread.join(timeout)
        return self._uuids
