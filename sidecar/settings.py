"""Sidecar settings: flags of ``pluto sidecar``, each with an environment equivalent."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pluto.wire import DEFAULT_API_SOCKET, DEFAULT_SOCKET
from pluto_sidecar.compression import Encoding

DEFAULT_SPOOL = "/var/run/pluto/spool"


@dataclass
class SidecarSettings:
    socket: Path = field(default_factory=lambda: Path(DEFAULT_SOCKET))
    #: The HTTP proxy of the server API (``pluto_sidecar.proxy``): files, checkpoints and
    #: queries of the training processes go through it with the sidecar's key. None: off.
    #: ``pluto sidecar`` defaults it to :func:`default_api_socket` of ``socket``.
    api_socket: Path | None = None
    server: str = "http://127.0.0.1:7300"
    spool_dir: Path = field(default_factory=lambda: Path(DEFAULT_SPOOL))
    #: Read from PLUTO_API_KEY or a file, never from the command line.
    api_key: str | None = None
    #: The file it was read from (a mounted Secret): read again when it changes, so a
    #: rotated Secret is picked up without a restart.
    api_key_file: Path | None = None
    #: The spool may hold this much unsent data; past it the sidecar stops reading clients.
    spool_max_bytes: int = 1024 * 1024 * 1024
    #: A batch is sent once it holds this many bytes ... (one batch is in memory at a time,
    #: compressed; 1 MiB keeps the sidecar's RSS under 60 MB at no cost in points/s on
    #: loopback: docs/benchmarks.md)
    batch_max_bytes: int = 1024 * 1024
    #: ... or its oldest record is this old.
    batch_max_age: float = 0.2
    #: Batches are compressed with zstd once the server says it takes it (gzip until then),
    #: or always with gzip (``pluto_sidecar.compression``).
    compression: Encoding = "zstd"
    #: SIGTERM: forward what is spooled for at most this long (Kubernetes grants 30 s).
    drain_seconds: float = 25.0
    #: How long OPEN_RUN waits for the server before answering "pending".
    open_wait: float = 5.0
    #: Health and Prometheus metrics (127.0.0.1 unless told otherwise; port 0: any).
    health_host: str = "127.0.0.1"
    health_port: int = 7301
    #: System metrics every this many seconds (0: off), labelled with this node rank.
    sys_interval: float = 10.0
    node_rank: int = 0
    max_frame_bytes: int = 16 * 1024 * 1024
    #: Frames being received at once, from all clients together, hold about this much memory
    #: (a bigger frame is read alone); see ``connection.ReceiveBudget``.
    receive_budget_bytes: int = 4 * 1024 * 1024
    #: A client that connects and says nothing is dropped after this long.
    hello_timeout: float = 10.0
    log_level: str = "INFO"
    #: Exit (draining first) once every client that connected has gone and none came back for
    #: this many seconds; 0: run until SIGTERM. For classic sidecar containers (Kubernetes
    #: before 1.29), which nothing stops when the training ends, so the pod could not complete.
    exit_when_idle: float = 0.0

    @staticmethod
    def env_defaults() -> dict[str, str]:
        """Environment equivalents of the flags."""
        names = {
            "socket": "PLUTO_SIDECAR_SOCKET",
            "api_socket": "PLUTO_SIDECAR_API_SOCKET",
            "server": "PLUTO_URL",
            "spool_dir": "PLUTO_SPOOL_DIR",
            "node_rank": "PLUTO_NODE_RANK",
        }
        return {attr: os.environ[var] for attr, var in names.items() if os.environ.get(var)}


def default_api_socket(socket: Path) -> Path:
    """Where the API socket goes when not told: beside the main socket, as ``api.sock``.

    That is where the SDK looks for it (``pluto.settings.Settings.api_socket``), so a pod
    only shares the socket directory and sets ``PLUTO_SIDECAR_SOCKET`` (or nothing, with the
    default ``/var/run/pluto``).
    """
    if str(socket) == DEFAULT_SOCKET:
        return Path(DEFAULT_API_SOCKET)
    return socket.parent / "api.sock"
