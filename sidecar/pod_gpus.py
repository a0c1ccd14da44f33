"""Which of the node's GPUs are this pod's, as its ranks tell the sidecar.

The operator gives the sidecar every GPU of the node (``NVIDIA_VISIBLE_DEVICES=all``); the
ranks name their containers' GPUs in NODE frames (``pluto.gpus``). Until one has, the
sidecar does not know whose GPUs it sees, so GPU readings wait: reporting the node's GPUs
first and the pod's later would put another pod's readings into this run's ``sys/gpu/0/``
series. A rank of a current SDK tells within a second or so of connecting; if none has
told ``grace_seconds`` after the first rank connected (an SDK from before NODE frames carried
GPUs), every GPU the sidecar sees is reported, as those releases did. A rank that tells an
empty list has no GPUs in its container: nothing is reported for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["GRACE_SECONDS", "PodGpus"]

#: How long GPU readings wait for a rank to name its GPUs, from the first rank's connection.
GRACE_SECONDS = 30.0


class PodGpus:
    def __init__(self, grace_seconds: float = GRACE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_seconds = grace_seconds
        self._clock = clock
        #: UUIDs in the order told (the first container's first), each once.
        self.uuids: list[str] = []
        #: Whether any rank has told (an empty list counts: its container has no GPUs).
        self.told = False
        self._first_client_at: float | None = None

    def client_connected(self) -> None:
        if self._first_client_at is None:
            self._first_client_at = self._clock()

    def tell(self, uuids: list[str]) -> list[str]:
        """A rank named its container's GPUs; returns those not known before."""
        self.told = True
        new = [uuid for uuid in dict.fromkeys(uuids) if uuid not in self.uuids]
        self.uuids.extend(new)
        return new

    def which(self) -> list[str] | None:
        """The UUIDs to report (``[]``: none yet, or none of the pod's), or None for every
        GPU the sidecar sees (nobody told, and the grace is over)."""
        if self.told:
            return self.uuids
        started = self._first_client_at
        if started is not None and self._clock() - started >= self.grace_seconds:
            return None
        return []
