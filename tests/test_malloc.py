"""The glibc ``mallopt`` settings of the server and the sidecar yield to the operator's."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pluto._malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, operator_set
from pluto_server.main import tune_malloc as tune_server_malloc
from pluto_sidecar.main import tune_malloc as tune_sidecar_malloc

OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@pytest.fixture
def no_operator_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPERATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_operator_choice")
def test_an_option_is_the_operators_through_its_variable_or_its_tunable(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not operator_set(M_MMAP_THRESHOLD)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=0")
    assert operator_set(M_MMAP_THRESHOLD) and not operator_set(M_TRIM_THRESHOLD)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert operator_set(M_TRIM_THRESHOLD)


@pytest.mark.usefixtures("no_operator_choice")
def test_the_server_leaves_each_explicit_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert tune_server_malloc() == (False, False)
    assert tune_sidecar_malloc() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_on_glibc_the_server_and_the_sidecar_set_their_thresholds() -> None:
    """In a child process: the thresholds would change this one's allocations."""
    env = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARIABLES}
    code = ("from pluto_server.main import tune_malloc as s; "
            "from pluto_sidecar.main import tune_malloc as c; print(s(), c())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split("\n")[0] == "(True, True) True"
