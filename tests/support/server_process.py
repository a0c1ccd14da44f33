"""A real ``pluto server`` in a subprocess, on a free loopback port.

Tests talk to the server over HTTP exactly as users do, and can stop it
(SIGTERM), kill it (SIGKILL) and start it again on the same port and the same
storage to check what survives. Its output goes to a log file (a pipe nobody
reads would fill up and stall it); start-up failures and :meth:`logs` show it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from support.processes import die_with_parent

from .postgres import free_port

__all__ = ["HEALTH_PATH", "ServerProcess", "ServerStartError", "clean_env", "env_for"]

HEALTH_PATH = "/api/v1/health"
_LOOPBACK = "127.0.0.1"

#: Builds the argv for a server process; the default runs ``python -m pluto server``.
CommandFactory = Callable[["ServerProcess"], list[str]]


class ServerStartError(RuntimeError):
    """The server exited or never answered its health check; carries its output."""


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without any ``PLUTO_*``/``MLOP_*`` variable.

    A developer's own ``PLUTO_RUN_ID`` or ``PLUTO_URL`` must not leak into a test.
    """
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if not k.startswith(("PLUTO_", "MLOP_"))}


def create_api_key(data_dir: Path, name: str, *extra: str) -> str:
    """A new API key, made by ``pluto keys create`` in the database of ``data_dir`` (the key is
    printed once, alone: captured here). ``extra``: more flags, such as ``--project P``."""
    done = subprocess.run([sys.executable, "-m", "pluto", "keys", "create", "--name", name,
                           "--data-dir", str(data_dir), *extra], capture_output=True, text=True,
                          env=clean_env(), timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def revoke_api_key(data_dir: Path, key: str) -> None:
    """``pluto keys revoke`` of ``key``, by its lookup part (``pluto_<lookup>_<secret>``)."""
    done = subprocess.run([sys.executable, "-m", "pluto", "keys", "revoke", key.split("_")[1],
                           "--data-dir", str(data_dir)], capture_output=True, text=True,
                          env=clean_env(), timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def env_for(server: ServerProcess, **extra: str) -> dict[str, str]:
    """Environment for a subprocess (a training script, ``pluto`` CLI) using ``server``.

    Starts from a clean copy of ``os.environ``, sets ``PLUTO_URL`` and a few
    settings that keep child output prompt and CPU use modest, then ``extra``.
    """
    env = clean_env()
    env.update(
        PLUTO_URL=server.url,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _default_command(server: ServerProcess) -> list[str]:
    argv = [
        sys.executable, "-m", "pluto", "server",
        "--host", server.host,
        "--port", str(server.port),
        "--data-dir", str(server.data_dir),
    ]
    if server.database_url is not None:
        argv += ["--database-url", server.database_url]
    return argv


class ServerProcess:
    """One tracking server process; restartable on the same port and storage.

    ``database_url`` ``None`` means the embedded default (SQLite in
    ``data_dir``). The port is picked once, at construction, and kept across
    restarts so URLs handed to clients stay valid.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None = None,
        host: str = _LOOPBACK,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 60.0,
        command: CommandFactory | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.database_url = database_url
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.server.log"
        self.startup_timeout = startup_timeout
        self._command = command or _default_command
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.starts = 0

    # -- introspection -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend(self) -> str:
        return "sqlite" if self.database_url is None else "postgres"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        return [*self._command(self), *self.extra_args]

    def logs(self, *, since_start: bool = False, limit: int | None = None) -> str:
        """The server's stdout+stderr (all starts, or only the latest one)."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since_start:
            data = data[self._log_offset:]
        text = data.decode(errors="replace")
        return text[-limit:] if limit else text

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(self.url + HEALTH_PATH, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float | None = None) -> ServerProcess:
        """Start (or restart) on the same port and storage; wait until healthy."""
        if self.running:
            raise RuntimeError(f"server already running (pid {self.pid}) on {self.url}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = clean_env()
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.update(self.extra_env)
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,
                env=env,
                start_new_session=True,  # a Ctrl-C at the terminal goes to pytest only
                preexec_fn=die_with_parent(),
            )
        self.starts += 1
        self.wait_healthy(self.startup_timeout if timeout is None else timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Poll ``GET /api/v1/health`` until 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise ServerStartError(
                    f"pluto server exited with code {self.returncode} before becoming healthy"
                    f" on {self.url}\n{self._describe()}"
                )
            try:
                resp = httpx.get(self.url + HEALTH_PATH, timeout=2.0)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        self.kill()
        raise ServerStartError(
            f"pluto server not healthy on {self.url} within {timeout:.0f}s (last: {last})"
            f"\n{self._describe()}"
        )

    def _describe(self) -> str:
        return (
            f"command: {' '.join(self.argv())}\n"
            f"log ({self.log_path}):\n{self.logs(since_start=True, limit=6000)}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: no shutdown code runs (a crash, an OOM kill)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        return proc.returncode

    def restart(self, *, hard: bool = False) -> ServerProcess:
        """Stop (or kill, with ``hard``) and start again on the same port and storage."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else f"exited {self.returncode}"
        return f"<ServerProcess {self.backend} {self.url} {state}>"
