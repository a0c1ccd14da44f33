"""System metrics the sidecar logs under ``sys/``: what keys, what values, and no noise.

These run against the real machine (psutil, and NVML when a driver is there). On a machine
without an NVIDIA driver, the sampler must produce no GPU keys and stay silent.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.nvml_stand_in import NVMLError_NotSupported, node_of, real_nvml_gpu_count

from pluto_sidecar.sysmetrics import SystemSampler

BASE_KEYS = {
    "sys/cpu_count",
    "sys/mem_used_bytes",
    "sys/mem_percent",
    "sys/spool_disk_used_bytes",
    "sys/spool_disk_free_bytes",
    "sys/spool_disk_percent",
}
RATE_KEYS = {"sys/cpu_percent", "sys/net_rx_bytes_per_s", "sys/net_tx_bytes_per_s"}
GPU_FIELDS = {"util_percent", "mem_used_bytes", "mem_percent", "power_watts", "temperature_c"}


HAS_GPU = real_nvml_gpu_count() > 0


class _Records(logging.Handler):
    """Collects records straight from the sampler's logger (independent of propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("pluto.sidecar.sysmetrics")
    handler = _Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def sampler(tmp_path: Path) -> Iterator[SystemSampler]:
    with SystemSampler(tmp_path) as s:
        yield s


def test_first_sample_has_levels_but_no_rates(sampler: SystemSampler) -> None:
    first = sampler.sample()
    assert first.keys() >= BASE_KEYS
    assert not (RATE_KEYS & first.keys()), "rates need a previous sample"
    assert all(key.startswith("sys/") for key in first)
    assert all(isinstance(value, float) for value in first.values())


def test_rates_appear_on_the_second_sample(sampler: SystemSampler) -> None:
    sampler.sample()
    _burn_cpu(0.2)
    second = sampler.sample()
    assert second.keys() >= BASE_KEYS | RATE_KEYS
    assert 0.0 <= second["sys/cpu_percent"] <= 100.0
    assert second["sys/net_rx_bytes_per_s"] >= 0.0
    assert second["sys/net_tx_bytes_per_s"] >= 0.0
    # Every later sample keeps them (the sidecar samples seconds apart; CPU time is accounted
    # in ~10 ms ticks, so two samples within one tick have no CPU figure).
    time.sleep(0.05)
    assert sampler.sample().keys() >= RATE_KEYS


def test_values_are_sane(sampler: SystemSampler, tmp_path: Path) -> None:
    sampler.sample()
    time.sleep(0.05)
    values = sampler.sample()
    assert values["sys/cpu_count"] >= 1
    assert values["sys/mem_used_bytes"] > 0
    assert 0.0 < values["sys/mem_percent"] <= 100.0
    assert 0.0 <= values["sys/spool_disk_percent"] <= 100.0

    disk = shutil.disk_usage(tmp_path)
    slack = 256 * 1024 * 1024  # other processes write to the same filesystem meanwhile
    assert values["sys/spool_disk_used_bytes"] > 0
    assert abs(values["sys/spool_disk_used_bytes"] - disk.used) < slack
    assert abs(values["sys/spool_disk_free_bytes"] - disk.free) < slack


def test_loopback_traffic_is_not_counted(sampler: SystemSampler) -> None:
    """Ranks talk to the sidecar over a Unix socket and NCCL may use lo: not pod traffic."""
    moved = 32 * 1024 * 1024
    before = time.monotonic()
    sampler.sample()
    assert _loopback_transfer(moved) == moved
    values = sampler.sample()
    window = time.monotonic() - before  # >= the sampler's own interval
    # Had lo been counted, rx * interval would be >= 32 MiB; other traffic is far below half.
    assert values["sys/net_rx_bytes_per_s"] * window < moved / 2
    assert values["sys/net_tx_bytes_per_s"] * window < moved / 2


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU visible to NVML")
def test_no_gpu_means_no_gpu_keys_and_no_noise(
    tmp_path: Path, records: list[logging.LogRecord], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with SystemSampler(tmp_path) as s:
            assert s.gpu_count == 0
            for _ in range(3):
                values = s.sample()
                assert not [key for key in values if key.startswith("sys/gpu/")]
    mine = [r for r in records if r.name.startswith("pluto.sidecar")]
    assert len(mine) <= 1
    assert all(r.levelno == logging.DEBUG for r in mine)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_gpus_false_never_touches_nvml(tmp_path: Path, records: list[logging.LogRecord]) -> None:
    with SystemSampler(tmp_path, gpus=False) as s:
        assert s.gpu_count == 0
        assert not [key for key in s.sample() if key.startswith("sys/gpu/")]
    assert records == []


@pytest.mark.skipif(not HAS_GPU, reason="no GPU visible to NVML on this machine")
def test_gpu_keys_per_device(sampler: SystemSampler) -> None:
    values = sampler.sample()
    assert sampler.gpu_count == real_nvml_gpu_count()
    for index in range(sampler.gpu_count):
        present = {field for field in GPU_FIELDS if f"sys/gpu/{index}/{field}" in values}
        assert {"util_percent", "mem_used_bytes", "mem_percent"} <= present
        assert 0.0 <= values[f"sys/gpu/{index}/util_percent"] <= 100.0
        assert 0.0 <= values[f"sys/gpu/{index}/mem_percent"] <= 100.0


def test_missing_spool_dir_is_skipped_not_raised(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    with SystemSampler(tmp_path / "does-not-exist", gpus=False) as s:
        for _ in range(3):
            values = s.sample()
            assert "sys/spool_disk_free_bytes" not in values
            assert "sys/mem_used_bytes" in values
    failing = [r for r in records if "spool disk" in r.getMessage()]
    assert len(failing) == 1, "a failing reading is reported once, not every sample"
    assert failing[0].levelno == logging.DEBUG


def test_close_is_idempotent(tmp_path: Path) -> None:
    s = SystemSampler(tmp_path)
    s.sample()
    s.close()
    s.close()
    assert s.gpu_count == 0
    assert "sys/mem_used_bytes" in s.sample()


def test_sampling_is_cheap(sampler: SystemSampler) -> None:
    """A sanity bound only (CI machines are noisy); the target is < 5 ms without GPUs."""
    sampler.sample()
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    per_sample = (time.perf_counter() - start) / n
    assert per_sample < 0.1


# -- helpers -------------------------------------------------------------------------


def _burn_cpu(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    x = 0
    while time.monotonic() < deadline:
        x += 1


def _loopback_transfer(total: int) -> int:
    """Push ``total`` bytes through a TCP connection on 127.0.0.1; returns bytes received."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received = 0

        def read() -> None:
            nonlocal received
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    received += len(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        with socket.create_connection(("127.0.0.1", port)) as client:
            block = b"x" * (1 << 20)
            for _ in range(total // len(block)):
                client.sendall(block)
        reader.join(10)
    return received


# -- the pod's GPUs among the node's (NVML stand-in: no GPU on these machines) ----------------


def _gpu_utils(values: dict[str, float]) -> dict[int, float]:
    return {int(key.split("/")[2]): value for key, value in values.items()
            if key.startswith("sys/gpu/") and key.endswith("/util_percent")}


def test_every_gpu_the_sidecar_sees_is_reported_until_the_ranks_say_which_are_theirs(
    tmp_path: Path,
) -> None:
    node = node_of("GPU-a", "GPU-b", "GPU-c", "GPU-d")  # util 10, 20, 30, 40
    with SystemSampler(tmp_path, nvml=node) as sampler:
        assert sampler.gpu_count == 4
        values = sampler.sample()
        assert _gpu_utils(values) == {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
        assert {key.rsplit("/", 1)[1] for key in values if key.startswith("sys/gpu/0/")} \
            == GPU_FIELDS
        # This pod's container was given c and a, and lists them in that order (its index 0
        # is c): only those are reported, under the index the training code uses.
        assert sampler.restrict_gpus(["GPU-c", "GPU-a"]) == []
        assert sampler.gpu_count == 2
        assert _gpu_utils(sampler.sample()) == {0: 30.0, 1: 10.0}
        assert sampler.restrict_gpus([]) == []  # a container without GPUs: none reported
        assert _gpu_utils(sampler.sample()) == {}
        sampler.restrict_gpus(None)  # every GPU again, by NVML index
        assert _gpu_utils(sampler.sample()) == {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    assert node.users == 0  # NVML shut down again


def test_a_gpu_the_ranks_use_but_the_sidecar_cannot_see_is_named_and_left_out(
    tmp_path: Path,
) -> None:
    with SystemSampler(tmp_path, nvml=node_of("GPU-a", "GPU-b")) as sampler:
        assert sampler.restrict_gpus(["GPU-x", "GPU-b"]) == ["GPU-x"]
        # Labels stay the ranks' indexes: b is their 1, whatever the sidecar cannot see.
        assert _gpu_utils(sampler.sample()) == {1: 20.0}
    with SystemSampler(tmp_path, gpus=False) as blind:  # no NVML at all: all missing, no keys
        assert blind.restrict_gpus(["GPU-a"]) == ["GPU-a"]
        assert _gpu_utils(blind.sample()) == {}


def test_telling_the_same_gpus_again_keeps_what_was_learnt_about_them(tmp_path: Path) -> None:
    node = node_of("GPU-a", "GPU-b")
    calls = 0

    def no_power(device: object) -> int:
        nonlocal calls
        calls += 1
        raise NVMLError_NotSupported("Not Supported")

    node.nvmlDeviceGetPowerUsage = no_power  # type: ignore[method-assign]
    with SystemSampler(tmp_path, nvml=node) as sampler:
        sampler.restrict_gpus(["GPU-b"])
        first = sampler.sample()
        sampler.restrict_gpus(["GPU-b"])  # every sample the sidecar says it again
        second = sampler.sample()
    assert "sys/gpu/0/util_percent" in first and "sys/gpu/0/power_watts" not in second
    assert calls == 1  # not supported on this board: asked once, not every sample


def test_uuids_in_bytes_from_older_nvml_bindings_match_too(tmp_path: Path) -> None:
    node = node_of("GPU-a", "GPU-b")
    node.uuid_bytes = True
    with SystemSampler(tmp_path, nvml=node) as sampler:
        assert sampler.restrict_gpus(["GPU-b"]) == []
        assert _gpu_utils(sampler.sample()) == {0: 20.0}
