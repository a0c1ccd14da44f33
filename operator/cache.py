"""The webhook's view of the cluster: PlutoRuns and namespaces, kept warm by kopf indices.

kopf lists and watches both kinds and keeps one in-memory index each (``index_plutoruns``,
``index_namespaces``), so answering an admission request costs dictionary lookups and no API
call. kopf gates every resource handler until all indices are filled from their first listing;
the namespace event handler that ``mark_warm`` is wired to therefore runs only then, which is
what ``/readyz`` waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import pydantic

from pluto_operator.model import PlutoRun
from pluto_operator.targets import KnownRun, NamespaceInfo

logger = logging.getLogger("pluto.operator.cache")


class ClusterView(Protocol):
    """What the injection reads about the cluster."""

    def namespace(self, name: str) -> NamespaceInfo | None: ...

    def runs(self, namespace: str) -> Iterable[KnownRun]: ...


def known_run(body: Mapping[str, Any]) -> KnownRun | None:
    """A PlutoRun body as the cache keeps it; None (and a log line) when it does not parse."""
    metadata = body.get("metadata") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace")
    try:
        run = PlutoRun.model_validate({
            "metadata": {"name": name, "namespace": namespace},
            "spec": body.get("spec"),
        })
        run.run_id  # noqa: B018  (raises ValueError when the name cannot be a run id)
    except (pydantic.ValidationError, ValueError) as exc:
        # The CRD schema normally rejects such an object; one stored before a schema change
        # can still appear. It covers no pod until fixed; the reconciler reports why.
        logger.warning("PlutoRun %s/%s is not usable: %s", namespace, name, exc)
        return None
    status = body.get("status")
    status = status if isinstance(status, Mapping) else {}
    opened = status.get("serverRunId") is not None
    status_run_id = status.get("runId") if opened else None
    status_project = status.get("project") if opened else None
    return KnownRun(
        name=str(name),
        namespace=str(namespace),
        created=str(metadata.get("creationTimestamp") or ""),
        run=run,
        # What the reconciler opened wins over the spec: pods of one job never split across
        # runs because the spec was edited between two of them.
        status_run_id=status_run_id if isinstance(status_run_id, str) else None,
        status_project=status_project if isinstance(status_project, str) else None,
        status_forked=status.get("forkedFrom") is not None if opened else None,
    )


def index_plutoruns(body: Mapping[str, Any], **_: Any) -> dict[str, KnownRun] | None:
    """kopf index handler: PlutoRuns by namespace."""
    known = known_run(body)
    return None if known is None else {known.namespace: known}


def index_namespaces(
    name: str, labels: Mapping[str, str], annotations: Mapping[str, str], **_: Any
) -> dict[str, NamespaceInfo]:
    """kopf index handler: namespace labels and annotations by name."""
    return {name: NamespaceInfo(dict(labels), dict(annotations))}


class IndexedView:
    """A ``ClusterView`` over kopf's two indices (live objects: kopf updates them in place)."""

    def __init__(self, plutoruns: Mapping[str, Iterable[KnownRun]],
                 namespaces: Mapping[str, Iterable[NamespaceInfo]]) -> None:
        self._plutoruns = plutoruns
        self._namespaces = namespaces
        self.warm = asyncio.Event()

    def namespace(self, name: str) -> NamespaceInfo | None:
        for info in self._namespaces.get(name, ()):
            return info
        return None

    def runs(self, namespace: str) -> Iterable[KnownRun]:
        return list(self._plutoruns.get(namespace, ()))

    def mark_warm(self) -> None:
        if not self.warm.is_set():
            logger.info("caches are warm: PlutoRuns and namespaces listed")
            self.warm.set()
