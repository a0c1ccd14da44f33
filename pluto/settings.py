"""SDK settings: ``pluto.init(settings=...)`` takes a ``Settings`` or a dict of its fields."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pluto.digits import parse_digits

DEFAULT_URL = "http://127.0.0.1:7300"


def _sidecar_socket() -> str | None:
    """``PLUTO_SIDECAR_SOCKET``, else the operator's default path when it exists."""
    from pluto.wire import DEFAULT_SOCKET

    configured = os.environ.get("PLUTO_SIDECAR_SOCKET")
    if configured:
        return configured
    return DEFAULT_SOCKET if os.path.exists(DEFAULT_SOCKET) else None


def _env_rank() -> int:
    for name in ("RANK", "PLUTO_RANK"):
        rank = parse_digits(os.environ.get(name))
        if rank is not None:
            return rank
    return 0


def _env_node_rank() -> int | None:
    return parse_digits(os.environ.get("GROUP_RANK"))


@dataclass(frozen=True)
class Settings:
    #: Tracking server URL. Env: ``PLUTO_URL``.
    url: str = field(default_factory=lambda: os.environ.get("PLUTO_URL", DEFAULT_URL))
    #: API key. Env: ``PLUTO_API_KEY``.
    api_key: str | None = field(default_factory=lambda: os.environ.get("PLUTO_API_KEY"))
    #: Log through the pod's sidecar at this Unix socket instead of to ``url`` directly.
    #: Env: ``PLUTO_SIDECAR_SOCKET``; default: /var/run/pluto/pluto.sock if it exists.
    sidecar_socket: str | None = field(default_factory=_sidecar_socket)
    #: Files, checkpoints and queries go through the sidecar's API proxy at this socket
    #: (the training container has no credentials). Env: ``PLUTO_SIDECAR_API_SOCKET``;
    #: default: ``api.sock`` beside ``sidecar_socket``.
    sidecar_api_socket: str | None = field(
        default_factory=lambda: os.environ.get("PLUTO_SIDECAR_API_SOCKET") or None
    )
    #: The writer label on every point: the process's rank. Env: ``RANK``.
    writer: int = field(default_factory=_env_rank)
    #: This process's node among the job's nodes, told to the sidecar for the label of the
    #: node's system metrics (None: not known). Env: ``GROUP_RANK`` (set by torchrun).
    node_rank: int | None = field(default_factory=_env_node_rank)
    #: Ship stdout/stderr lines (fd level) as the run's log.
    console: bool = field(
        default_factory=lambda: os.environ.get("PLUTO_CONSOLE", "1") not in ("0", "false")
    )
    #: How long ``init()`` keeps trying to reach the server.
    init_timeout: float = 15.0
    #: How long ``finish()`` waits for delivery before giving up (data stays spooled).
    finish_timeout: float = 30.0
    #: The background thread sends at least this often (seconds).
    flush_interval: float = 0.2
    #: Points per chunk at most; bigger backlogs go in several chunks.
    max_chunk_points: int = 200_000
    #: ``log()`` blocks the caller once this many calls wait in memory (never drops).
    max_buffered_calls: int = 500_000
    #: fsync the spool on every chunk (survives power loss, not only a crash).
    fsync: bool = True
    #: Per-request HTTP timeout (seconds).
    http_timeout: float = 30.0

    @property
    def api_socket(self) -> str | None:
        """Where API calls go in sidecar mode; None when talking to ``url`` directly."""
        if self.sidecar_api_socket:
            return self.sidecar_api_socket
        if self.sidecar_socket:
            return os.path.join(os.path.dirname(self.sidecar_socket), "api.sock")
        return None

    @classmethod
    def build(cls, value: Settings | dict[str, Any] | None) -> Settings:
        if value is None:
            return cls()
        if isinstance(value, Settings):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown pluto setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return replace(cls(), **value)


def default_dir(explicit: str | os.PathLike[str] | None) -> Path:
    """Where the SDK keeps its spool: ``dir=``, ``PLUTO_DIR``, or ``./.pluto``."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("PLUTO_DIR", ".pluto"))
