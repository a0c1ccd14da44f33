"""A small real filesystem (tmpfs) for tests that fill a volume: the spool's writes then fail
with ``ENOSPC`` exactly as on a full disk, and space comes back when files are deleted.

``small_tmpfs(path, size)`` mounts a tmpfs of ``size`` bytes at ``path`` (made if missing)
in this process's mount namespace, so the test and any process it starts (a sidecar restarted
on the same spool) see the same volume, and unmounts it afterwards (lazily: a process that
still has a file open there does not keep the test from finishing). Mounting needs
``CAP_SYS_ADMIN`` (root in a container, as in CI): without it the test is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["fill", "free_bytes", "small_tmpfs"]


def _mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount; None when it worked, else why not."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                           "pluto-test-spool", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        return (f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN; uid {os.getuid()}): "
                f"{done.stderr.strip() or done.returncode}")
    return None


@contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` for the duration; skips the test when
    this machine does not let it mount one."""
    path.mkdir(parents=True, exist_ok=True)
    why_not = _mount_tmpfs(path, size)
    if why_not is not None:
        pytest.skip(f"a small spool volume is needed: {why_not}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fill(path: Path, leave: int = 0) -> Path:
    """Write a file at ``path`` until its volume has at most ``leave`` bytes free (returns the
    file: deleting it gives the space back)."""
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as handle:
        while True:
            room = free_bytes(path.parent) - leave
            if room <= 0:
                break
            try:
                handle.write(block[:min(len(block), room)])
            except OSError:
                break
    return path
