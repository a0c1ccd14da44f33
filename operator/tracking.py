"""The operator's calls to the tracking server: open (create, attach or fork), update, finish.

The fork of a PlutoRun happens here, once, on the server; the pods then attach to the fork by its
run id. Errors are sorted for the reconciler: ``Unreachable`` is retried with backoff, and so is
``KeyRefused`` (the operator's key is fixed outside the PlutoRun), while ``Refused`` (a 4xx the
server explains) needs the PlutoRun changed and is not retried.
"""

from __future__ import annotations

import threading
import urllib.parse
from typing import Any, TypeVar

from pluto.credentials import ApiKey
from pluto.errors import RequestRejected, ServerUnavailable
from pluto.transport.http import ApiClient
from pluto.wire import Lineage, RunAttached, RunCreate, RunFinish, RunInfo, RunStatus, RunUpdate
from pluto_operator.model import PlutoRunSpec

T = TypeVar("T")


class Unreachable(Exception):
    """The server did not answer, or answered with a retryable error."""


class KeyRefused(Unreachable):
    """The server refuses the operator's own API key (401), or the key may not reach the
    PlutoRun's project (403). Retried like ``Unreachable``: the fix is outside the PlutoRun
    (the key's Secret created, or rotated; the operator reads its key file again when it
    changes)."""


class Refused(Exception):
    """The server refused the request for a reason the PlutoRun's author must fix."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        #: The HTTP status (409: the run exists with another fork than the one asked for).
        self.status_code = status_code


def run_create(spec: PlutoRunSpec, run_id: str) -> RunCreate:
    fork = spec.fork
    return RunCreate(
        project=spec.project,
        run_id=run_id,
        name=spec.name,
        config=spec.config or None,
        tags=spec.tags or None,
        fork_run_id=fork.run_id if fork is not None else None,
        fork_step=fork.step if fork is not None else None,
        inherit_config=fork.inherit_config if fork is not None else True,
        inherit_tags=fork.inherit_tags if fork is not None else False,
    )


class TrackingServers:
    """One HTTP client per server URL (PlutoRuns may name different servers)."""

    def __init__(self, api_key: str | ApiKey | None, timeout: float = 10.0) -> None:
        self.api_key = api_key
        self.timeout = timeout
        self._clients: dict[str, ApiClient] = {}
        self._lock = threading.Lock()

    def _client(self, url: str) -> ApiClient:
        with self._lock:
            found = self._clients.get(url)
            if found is None:
                found = self._clients[url] = ApiClient(url, self.api_key, self.timeout)
            return found

    def _call(self, url: str, method: str, path: str, reply: type[T], body: object,
              params: dict[str, Any] | None = None) -> T:
        try:
            return self._client(url).call(method, path, reply, body=body, params=params)
        except ServerUnavailable as exc:
            raise Unreachable(str(exc)) from exc
        except RequestRejected as exc:
            # 403: a key limited to another project. The PlutoRun's project cannot change,
            # so the fix is a key that reaches it, as for a 401.
            if exc.credentials_refused or exc.status_code == 403:
                raise KeyRefused(f"the server refuses the operator's API key: {exc}") from exc
            if exc.permanent:
                raise Refused(str(exc), exc.status_code) from exc
            raise Unreachable(str(exc)) from exc

    def open_run(self, url: str, spec: PlutoRunSpec, run_id: str) -> RunAttached:
        return self._call(url, "POST", "/runs", RunAttached, run_create(spec, run_id))

    def fork_owner(self, url: str, project: str, ref: str, step: int) -> int:
        """Numeric id of the run a fork of ``ref`` at ``step`` records as its parent.

        The server records the ancestor that *owns* the step, not necessarily ``ref``: walking
        up ``ref``'s lineage, the first run whose own fork step is before ``step``.
        """
        path = f"/runs/{urllib.parse.quote(ref, safe='')}/lineage"
        lineage = self._call(url, "GET", path, Lineage, None, params={"project": project})
        for link in lineage.ancestors:
            if link.fork_step is None or step > link.fork_step:
                return link.id
        if not lineage.ancestors:
            raise Refused(f"the server returned no lineage for run {ref!r}")
        return lineage.ancestors[-1].id

    def find_run(self, url: str, project: str, ref: str) -> RunInfo:
        """The run ``ref`` names in ``project`` (its external, display or numeric id)."""
        return self._call(url, "GET", f"/runs/{urllib.parse.quote(ref, safe='')}", RunInfo,
                          None, params={"project": project})

    def get_run(self, url: str, server_run_id: int) -> RunInfo:
        return self._call(url, "GET", f"/runs/{server_run_id}", RunInfo, None)

    def update_run(self, url: str, server_run_id: int, update: RunUpdate) -> RunInfo:
        return self._call(url, "PATCH", f"/runs/{server_run_id}", RunInfo, update)

    def finish_run(self, url: str, server_run_id: int, status: RunStatus) -> RunInfo:
        return self._call(url, "POST", f"/runs/{server_run_id}/finish", RunInfo,
                          RunFinish(status=status))

    def close(self) -> None:
        with self._lock:
            for found in self._clients.values():
                found.close()
            self._clients.clear()
