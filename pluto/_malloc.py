"""glibc ``mallopt`` for the long-running processes (sidecar, server), unless the operator chose.

Each process sets the options that suit the way it allocates: see the callers
(``pluto_sidecar.main.tune_malloc``, ``pluto_server.main.tune_malloc``). An option is left
alone where its environment variable (``MALLOC_MMAP_THRESHOLD_``, ...) or its
``GLIBC_TUNABLES`` entry is set, so the operator's choice wins, and where the C library
has no ``mallopt`` (not glibc: nothing to do).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MallocOption:
    """One ``mallopt`` parameter: its number in ``<malloc.h>`` and how an operator sets it."""

    number: int
    env: str  # the environment variable glibc reads at start-up
    tunable: str  # its name in GLIBC_TUNABLES


M_TRIM_THRESHOLD = MallocOption(-1, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold")
M_MMAP_THRESHOLD = MallocOption(-3, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold")


def operator_set(option: MallocOption) -> bool:
    """Whether the process's environment already chose this option."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return option.env in os.environ or any(
        item.partition("=")[0] == option.tunable for item in tunables.split(":"))


def mallopt(option: MallocOption, value: int) -> bool:
    """Set one option unless the operator did; True when glibc took it."""
    if operator_set(option):
        return False
    try:
        function = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(function(option.number, value))
