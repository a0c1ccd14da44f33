"""Runs this sidecar has opened: one attach per run, shared by every local rank.

A run is keyed by (project, external id). It is *resolved* once the server has
answered, or *pending* while an OPEN record waits in the spool for the server to
come back. Connections subscribe to a pending run and are told when it resolves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from pluto.wire import RunAttached

RunKey = tuple[str, str]
Listener = Callable[[RunKey, RunAttached | None, str | None], None]


@dataclass
class RunEntry:
    info: RunAttached | None = None
    pending: str | None = None
    failed: str | None = None
    listeners: list[Listener] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The first local client learns the server's ``resumed``; later ones attach to it.
    handed_out: bool = False


def as_resumed(info: RunAttached) -> RunAttached:
    """The same run as seen by a rank that attached to it rather than created it."""
    return msgspec.structs.replace(info, resumed=True)


class RunRegistry:
    def __init__(self) -> None:
        self._runs: dict[RunKey, RunEntry] = {}

    def entry(self, key: RunKey) -> RunEntry:
        return self._runs.setdefault(key, RunEntry())

    def get(self, key: RunKey) -> RunEntry | None:
        return self._runs.get(key)

    def active(self) -> list[RunKey]:
        """Runs opened or pending here (failed ones excluded)."""
        return [key for key, entry in self._runs.items()
                if entry.failed is None and (entry.info is not None or entry.pending)]

    @property
    def pending_count(self) -> int:
        return sum(1 for entry in self._runs.values() if entry.pending and entry.info is None)

    def resolve(self, key: RunKey, info: RunAttached) -> None:
        entry = self.entry(key)
        entry.info, entry.pending = info, None
        self._notify(key, entry, info, None)

    def fail(self, key: RunKey, detail: str) -> None:
        entry = self.entry(key)
        entry.failed, entry.pending = detail, None
        self._notify(key, entry, None, detail)

    def subscribe(self, key: RunKey, listener: Listener) -> None:
        self.entry(key).listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        for entry in self._runs.values():
            if listener in entry.listeners:
                entry.listeners.remove(listener)

    @staticmethod
    def _notify(key: RunKey, entry: RunEntry, info: RunAttached | None,
                error: str | None) -> None:
        """Tell the ranks that waited. Only the first of them can be the creator: the
        others, like every rank that opens the run later, attached (``resumed``)."""
        listeners, entry.listeners = entry.listeners, []
        for listener in listeners:
            if info is not None and entry.handed_out and not info.resumed:
                listener(key, as_resumed(info), error)
            else:
                listener(key, info, error)
            entry.handed_out = entry.handed_out or info is not None
