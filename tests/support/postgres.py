"""A real, throwaway PostgreSQL cluster for the test session.

Why a real cluster and not a mock: the server's race-freedom (attach through a
unique constraint), its transactions and its SQL only mean something against
the real thing. The cluster lives in a temporary directory, listens on
127.0.0.1 only (plus a Unix socket inside that directory), uses ``trust`` auth,
runs with durability switched off (nothing here must survive a power cut) and
is stopped by the PID of the process we started.

PostgreSQL refuses to run as root, so under root the binaries run as the
``postgres`` OS user that the Debian package creates (the same thing
``setpriv --reuid postgres`` does, done by :mod:`subprocess` itself so that the
PID we hold *is* the postmaster, with no wrapper in between that would turn
our fast-shutdown signal into a smart one).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from support.processes import die_with_parent

__all__ = [
    "PostgresCluster",
    "PostgresNotFound",
    "PostgresStartError",
    "find_postgres_bindir",
    "free_port",
    "libpq_url",
    "start_cluster",
]

#: The bootstrap superuser of the cluster (``initdb -U``); independent of the OS user.
SUPERUSER = "pluto"
#: Environment variable that pins the directory holding ``initdb`` and ``postgres``.
BINDIR_ENV = "PLUTO_TEST_PG_BINDIR"
_LOOPBACK = "127.0.0.1"


class PostgresNotFound(RuntimeError):
    """No ``initdb``/``postgres`` pair on this machine (``make postgres`` installs one)."""


class PostgresStartError(RuntimeError):
    """``initdb`` or the postmaster failed; the message carries their log."""


def free_port(host: str = _LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` (SQLAlchemy form) as plain libpq ``postgresql://...``."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<major>/bin: newest major wins; non-numeric names sort first.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) or (-1,)


def find_postgres_bindir() -> Path:
    """The directory with ``initdb`` and ``postgres``.

    Order: ``$PLUTO_TEST_PG_BINDIR``; ``pg_config --bindir`` (it may belong to a
    client-only install, so the binaries are checked); the newest
    ``/usr/lib/postgresql/*/bin``; ``initdb`` on ``PATH``.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        bindir = Path(override)
        if _has_server_binaries(bindir):
            return bindir
        raise PostgresNotFound(f"${BINDIR_ENV}={override} has no initdb/postgres binaries")

    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)

    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    raise PostgresNotFound(
        "PostgreSQL server binaries (initdb, postgres) not found via pg_config --bindir, "
        "/usr/lib/postgresql/*/bin or PATH. Install them with `make postgres` "
        f"(Debian package `postgresql`) or point ${BINDIR_ENV} at their directory."
    )


@dataclass(frozen=True)
class _RunAs:
    """Who runs the PostgreSQL binaries: ourselves, or ``postgres`` when we are root."""

    user: str | None
    uid: int
    gid: int

    @classmethod
    def detect(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(user=None, uid=os.geteuid(), gid=os.getegid())
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresStartError(
                "running as root, and PostgreSQL refuses root: an OS user `postgres` is "
                "needed (the Debian package `postgresql` creates it; `make postgres`)"
            ) from None
        return cls(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return text[-limit:]


class PostgresCluster:
    """One ``initdb``-ed cluster and the postmaster serving it.

    Use :func:`start_cluster` (a context manager) or ``start()``/``stop()``.
    :meth:`create_database` gives each suite its own database, so suites sharing
    the cluster never see each other's rows.
    """

    def __init__(self, bindir: Path | None = None, *, base_dir: Path | None = None) -> None:
        self.bindir = bindir or find_postgres_bindir()
        self._run_as = _RunAs.detect()
        self._own_base_dir = base_dir is None
        self.base_dir = base_dir or self._make_base_dir()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self.host = _LOOPBACK
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths and processes -------------------------------------------------------

    def _make_base_dir(self) -> Path:
        # Under root the postgres user must reach the directory: pytest's own tmp_path
        # is 0700 root, so use a world-traversable parent (normally /tmp).
        parent = tempfile.gettempdir()
        if self._run_as.user is not None and not os.stat(parent).st_mode & 0o001:
            parent = "/tmp"
        return Path(tempfile.mkdtemp(prefix="pluto-pg-", dir=parent))

    def _chown(self, path: Path) -> None:
        if self._run_as.user is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _spawn(self, argv: list[str], log: int) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        if self._run_as.user is not None:
            env["HOME"] = str(self.base_dir)
            env["USER"] = env["LOGNAME"] = self._run_as.user
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base_dir,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGINT),
            user=self._run_as.uid if self._run_as.user else None,
            group=self._run_as.gid if self._run_as.user else None,
            extra_groups=[] if self._run_as.user else None,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------

    def _initdb(self) -> None:
        self._chown(self.base_dir)
        os.chmod(self.base_dir, 0o700)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = self._spawn(
                [
                    str(self.bindir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                fd,
            )
        finally:
            os.close(fd)
        if proc.wait(timeout=120) != 0:
            raise PostgresStartError(
                f"initdb failed (exit {proc.returncode}); log {self.log_path}:\n"
                + _tail(self.log_path)
            )

    def start(self, *, timeout: float = 60.0, attempts: int = 3) -> PostgresCluster:
        """``initdb`` (once) and start the postmaster on a free loopback port."""
        if self.running:
            return self
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        last_error: PostgresStartError | None = None
        for _ in range(attempts):
            try:
                self._start_postmaster(free_port(self.host), timeout)
                return self
            except PostgresStartError as exc:  # most likely a lost race for the port
                last_error = exc
        assert last_error is not None
        raise last_error

    def _start_postmaster(self, port: int, timeout: float) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._proc = self._spawn(
                [
                    str(self.bindir / "postgres"),
                    "-D", str(self.data_dir),
                    "-p", str(port),
                    "-k", str(self.socket_dir),
                    "-c", f"listen_addresses={self.host}",
                    "-c", "max_connections=300",
                    "-c", "fsync=off",
                    "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                    "-c", "shared_buffers=64MB",
                    "-c", "log_min_messages=warning",
                ],
                fd,
            )
        finally:
            os.close(fd)
        self.port = port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with psycopg.connect(self.libpq_url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        log = self.log_path.read_bytes()[log_offset:].decode(errors="replace")[-4000:]
        self.stop()
        raise PostgresStartError(
            f"postgres did not accept connections on {self.host}:{port} within {timeout}s "
            f"(exit code {self._proc.returncode}); log {self.log_path}:\n{log}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT) of the postmaster we started; escalate if it hangs."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def destroy(self) -> None:
        """Stop, then delete the cluster directory (only when we created it)."""
        self.stop()
        if self._own_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- URLs and databases --------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy/psycopg form: ``postgresql+psycopg://pluto@127.0.0.1:PORT/DB``."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def libpq_url(self, dbname: str = "postgres") -> str:
        """Plain libpq form, for ``psycopg.connect`` and ``psql``."""
        return libpq_url(self.url(dbname))

    def create_database(self, hint: str = "test") -> str:
        """``CREATE DATABASE`` with a unique name derived from ``hint``; returns its URL."""
        stem = re.sub(r"[^a-z0-9_]+", "_", hint.lower()).strip("_")[:40] or "test"
        name = f"{stem}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.libpq_url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database`, kicking out its sessions."""
        name = url.rsplit("/", 1)[-1]
        with psycopg.connect(self.libpq_url("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def start_cluster(bindir: Path | None = None) -> Iterator[PostgresCluster]:
    """A started cluster, stopped and deleted on exit."""
    cluster = PostgresCluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.destroy()
