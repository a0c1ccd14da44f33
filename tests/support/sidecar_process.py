"""A real ``pluto sidecar`` in a subprocess, serving a Unix socket in a temp dir.

Tests start it, SIGKILL it, restart it on the same socket and spool, and read
its health endpoints, exactly as the kubelet and Prometheus would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from support.processes import die_with_parent

from .postgres import free_port
from .server_process import clean_env

__all__ = ["SidecarProcess", "SidecarStartError"]



class SidecarStartError(RuntimeError):
    """The sidecar exited or never became ready; carries its log."""


class SidecarProcess:
    """``pluto sidecar --socket DIR/pluto.sock --spool-dir DIR/spool --server URL``.

    ``extra_args`` go on the command line (e.g. ``["--spool-max-mb", "1"]``);
    ``env`` adds environment variables (``PLUTO_API_KEY`` for instance).
    """

    def __init__(self, directory: Path, server_url: str, *, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, node_rank: int = 0) -> None:
        self.directory = directory
        self.server_url = server_url
        self.socket = directory / "pluto.sock"
        self.spool_dir = directory / "spool"
        self.log_path = directory / "sidecar.log"
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.node_rank = node_rank
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "pluto", "sidecar", "--socket", str(self.socket),
                "--spool-dir", str(self.spool_dir), "--server", self.server_url,
                "--health-port", str(self.health_port), "--node-rank", str(self.node_rank),
                *self.extra_args]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def start(self, timeout: float = 20.0) -> SidecarProcess:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT,
                env={**clean_env(), "PYTHONUNBUFFERED": "1", **self.env},
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SidecarStartError(f"sidecar exited with {self.proc.returncode}:\n"
                                        + self.logs(since_start=True))
            try:
                if httpx.get(self.health_url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SidecarStartError("sidecar not ready in time:\n" + self.logs(since_start=True))

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (drain), then wait; SIGKILL only if it overstays ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.kill()
        return self.proc.wait()

    def logs(self, *, since_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self._log_offset if since_start else 0:].decode(errors="replace")

    def events(self) -> list[dict[str, object]]:
        """The sidecar's structured log lines (one JSON object each)."""
        events = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def metrics(self) -> str:
        return httpx.get(self.health_url + "/metrics", timeout=5).text

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a training process that logs through this sidecar."""
        return {**clean_env(), "PLUTO_SIDECAR_SOCKET": str(self.socket), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", **extra}

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
