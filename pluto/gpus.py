"""The GPUs this process's container can use, by UUID, as NVML lists them.

A rank tells its sidecar (in the NODE frame) so that the sidecar reports this pod's GPUs and
not every GPU of the node: the operator gives the sidecar ``NVIDIA_VISIBLE_DEVICES=all``
because it cannot know at admission which GPUs the device plugin will hand the training
container, and two training pods sharing a node would otherwise both report all of them.

NVML inside a container lists only the devices the container runtime gave it, in the
container's own order (index 0 first), so the position of a UUID in the list is the index the
training code sees. The NVIDIA runtime puts NVML's library into a container only when it is given
GPUs, so NVML failing to start means "this container has no GPUs" (an empty list, which the
sidecar takes as "report none"), not "unknown". Finding them never fails the training script.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["GpuLookup", "container_gpu_uuids", "uuid_text"]


def container_gpu_uuids(nvml: Any = None) -> list[str] | None:
    """UUIDs of the GPUs NVML lists for this process, in index order: ``[]`` when NVML cannot
    start (no library or driver: no GPUs here) or lists none, None when its Python bindings
    are not installed (unknown). ``nvml`` is the ``pynvml`` module (imported when not given)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-untyped,no-redef]  # ships no stubs
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: no GPU here
        return []
    try:
        return [uuid_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)))
                for index in range(int(nvml.nvmlDeviceGetCount()))]
    except Exception:  # a GPU NVML cannot name cannot be matched by the sidecar either
        return []
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()  # NVML counts its users: the trainer's own use goes on


def uuid_text(uuid: str | bytes) -> str:
    """What ``nvmlDeviceGetUUID`` answered, as text: nvidia-ml-py answers str, releases
    before 11.515 answered bytes."""
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


class GpuLookup:
    """:func:`container_gpu_uuids` in a daemon thread, started at once: NVML's start can take
    a good part of a second on a node with many GPUs, which ``pluto.init()`` does not wait
    for. :attr:`done` tells when :meth:`result` holds the answer."""

    def __init__(self, find: Callable[[], list[str] | None] = container_gpu_uuids) -> None:
        self._find = find
        self._uuids: list[str] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pluto-gpus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._uuids = self._find()
        except Exception:  # a lookup that breaks means "unknown", never a crash
            self._uuids = None
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> list[str] | None:
        """The container's GPU UUIDs (``[]``: none); None while not done, or unknown."""
        return self._uuids if self.done else None

    def wait(self, timeout: float | None = None) -> list[str] | None:
        self._done.wait(timeout)
        return self.result()

    @classmethod
    def for_this_process(cls) -> GpuLookup:
        """One lookup per process, shared by every ``pluto.init()`` in it (a container's
        GPUs do not change); a forked child starts its own."""
        global _process_lookup
        pid = os.getpid()
        with _process_lookup_lock:
            if _process_lookup is None or _process_lookup[0] != pid:
                _process_lookup = (pid, cls())
            return _process_lookup[1]


_process_lookup: tuple[int, GpuLookup] | None = None
_process_lookup_lock = threading.Lock()
