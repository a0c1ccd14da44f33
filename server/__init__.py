"""The Pluto tracking server: runs, forks and lineage, metrics, logs, API keys."""

from __future__ import annotations

__version__ = "0.1.0"
