"""What every helper that starts a process for a test needs: not outliving the test, stopping
one process by its PID, and the tail of its log."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` asking Linux to send ``sig`` when the test process goes away.

    A pytest killed hard (``kill -9``, a CI timeout) cannot run its finalizers; this keeps it
    from leaving servers, sidecars or operators behind. It runs in the child after any uid
    switch, which would otherwise clear the setting.
    """

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM this one process, SIGKILL it after ``timeout``; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` bytes of a log file as text ("" when there is none yet)."""
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except FileNotFoundError:
        return ""


def peak_rss_mib(pid: int) -> float:
    """A process's high-water mark of resident memory (VmHWM), in MiB. Unlike ru_maxrss it
    starts afresh at exec, so it never counts the process this one was forked from."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
