"""``pluto.gpus``: the UUIDs of the GPUs a rank's container uses, as it tells its sidecar.

NVML itself needs an NVIDIA GPU and driver, which these machines lack: the real library is
tested for what it does here (nothing found, nothing raised), and a stand-in named as such
(``support.nvml_stand_in``) plays a node with GPUs.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest
from support.nvml_stand_in import node_of, real_nvml_gpu_count

from pluto.gpus import GpuLookup, container_gpu_uuids


@pytest.mark.skipif(real_nvml_gpu_count() > 0, reason="this machine has a GPU visible to NVML")
def test_without_a_gpu_or_driver_nothing_is_found_and_nothing_is_said() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert container_gpu_uuids() == []


def test_the_container_gpus_in_nvml_order_and_nvml_shut_down_again() -> None:
    node = node_of("GPU-7f", "GPU-03")
    assert container_gpu_uuids(node) == ["GPU-7f", "GPU-03"]
    assert node.users == 0  # the trainer's own NVML use (if any) is not ended by ours
    node.uuid_bytes = True  # nvidia-ml-py before 11.515
    assert container_gpu_uuids(node) == ["GPU-7f", "GPU-03"]


def test_without_the_nvml_bindings_the_gpus_are_unknown(monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert container_gpu_uuids() is None


def test_an_nvml_that_fails_means_no_gpus_here_not_an_error() -> None:
    no_driver = node_of("GPU-a")
    no_driver.fail_init = True
    assert container_gpu_uuids(no_driver) == []

    broken = node_of("GPU-a", "GPU-b")

    def lost(device: object) -> str:
        raise broken.NVMLError("GPU is lost")

    broken.nvmlDeviceGetUUID = lost  # type: ignore[method-assign]
    assert container_gpu_uuids(broken) == []
    assert broken.users == 0


def test_the_lookup_answers_none_until_it_is_done_and_never_raises() -> None:
    release = threading.Event()

    def slow() -> list[str]:
        release.wait(10)
        return ["GPU-a"]

    lookup = GpuLookup(slow)
    assert lookup.result() is None and not lookup.done
    release.set()
    assert lookup.wait(10) == ["GPU-a"] == lookup.result()
    assert lookup.done

    def broken() -> list[str]:
        raise RuntimeError("boom")

    failed = GpuLookup(broken)
    assert failed.wait(10) is None and failed.done  # unknown: the sidecar decides


def test_one_lookup_serves_every_init_of_a_process() -> None:
    first = GpuLookup.for_this_process()
    assert GpuLookup.for_this_process() is first
    first.wait(30)
    assert first.done
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a forked child (a DataLoader worker, say) looks up for itself
        mine = GpuLookup.for_this_process()
        mine.wait(30)
        os.write(write, b"new" if mine is not first and mine.done else b"old")
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 16) == b"new"
    os.close(read)
