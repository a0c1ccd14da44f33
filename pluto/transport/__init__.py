"""Transports: how a process reaches the tracking server (directly, or via the sidecar)."""

from pluto.transport.base import Transport
from pluto.transport.http import HttpTransport
from pluto.transport.sidecar import SidecarTransport

__all__ = ["HttpTransport", "SidecarTransport", "Transport"]
