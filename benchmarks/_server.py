"""Start a real ``pluto server`` for a benchmark and stop it afterwards (by PID)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(database_url: str | None = None) -> Iterator[str]:
    with server_process(database_url) as (url, _):
        yield url


@contextlib.contextmanager
def server_process(database_url: str | None = None,
                   extra_args: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """A server's URL and PID."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pluto-bench-") as data_dir:
        argv = [sys.executable, "-m", "pluto", "server", "--port", str(port),
                "--data-dir", str(Path(data_dir) / "data")]
        if database_url:
            argv += ["--database-url", database_url]
        argv += extra_args
        log = open(Path(data_dir) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError("server did not start: "
                                       + (Path(data_dir) / "server.log").read_text()[-2000:])
                time.sleep(0.1)
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
