"""Runs this sidecar has opened: one attach per run, shared by every local rank.

A run is keyed by (project, external id). It is *resolved* once the server has
answered, or *pending* while an OPEN record waits in the spool for the server to
come back. Connections subscribe to a pending run and are told when it resolves.

A run's *clients* are the connections that opened it and have not finished it (sent
their last chunk, the one that carries the final status) or gone away. They decide two
things: a cached answer is only handed to ranks that open the run while others of it are
still on (the ranks of one job; a process that opens it after they all left is a restart,
and ``resume=True`` needs the server's current last step), and system metrics go to a
run only until it is finished and none of its clients is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from pluto.wire import RunAttached, RunCreate

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
    #: The request the server answered with ``info`` (None: not known, e.g. a cached
    #: answer from before this field was set).
    answered: RunCreate | None = None
    #: Clients (their listeners) that opened the run and have neither finished nor left.
    clients: set[Listener] = field(default_factory=set)
    #: A final-status chunk came through since the run was last opened here.
    finished: bool = False


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
        """Runs opened or pending here that are not over: failed ones excluded, and so are
        runs whose final status came through once none of their clients is left (a rank
        that resumes such a run opens it again, which makes it active again)."""
        return [key for key, entry in self._runs.items()
                if entry.failed is None and (entry.info is not None or entry.pending)
                and not (entry.finished and not entry.clients)]

    def key_of(self, run: int) -> RunKey | None:
        """The key of the run with numeric id ``run``, when the server has told it here."""
        for key, entry in self._runs.items():
            if entry.info is not None and entry.info.id == run:
                return key
        return None

    @property
    def pending_count(self) -> int:
        return sum(1 for entry in self._runs.values() if entry.pending)

    def resolve(self, key: RunKey, info: RunAttached,
                request: RunCreate | None = None) -> None:
        entry = self.entry(key)
        entry.info, entry.pending = info, None
        if request is not None:
            entry.answered = request
        self._notify(key, entry, info, None)

    def attach(self, key: RunKey, client: Listener) -> None:
        """``client`` opened the run: it counts as one of the run's clients until it
        finishes it or leaves (``finished``, ``unsubscribe``)."""
        entry = self.entry(key)
        entry.clients.add(client)
        entry.finished = False

    def finished_by(self, key: RunKey, client: Listener) -> None:
        """``client`` sent its last chunk, the one with the run's final status."""
        entry = self.get(key)
        if entry is not None:
            entry.finished = True
            entry.clients.discard(client)

    def fail(self, key: RunKey, detail: str) -> None:
        entry = self.entry(key)
        entry.failed, entry.pending = detail, None
        self._notify(key, entry, None, detail)

    def subscribe(self, key: RunKey, listener: Listener) -> None:
        self.entry(key).listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """The client is gone: it waits for no run and is no run's client any more."""
        for entry in self._runs.values():
            if listener in entry.listeners:
                entry.listeners.remove(listener)
            entry.clients.discard(listener)

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
