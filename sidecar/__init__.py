"""The per-pod sidecar: ranks log to it over a Unix socket; it spools durably and
forwards batches to the tracking server exactly once."""

from __future__ import annotations

__version__ = "0.1.0"
