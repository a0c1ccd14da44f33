"""Transports: how a process reaches the tracking server (directly, or via the sidecar)."""

from pluto.transport.base import Transport
from pluto.transport.http import HttpTransport

__all__ = ["HttpTransport", "Transport"]
