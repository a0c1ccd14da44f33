"""Which run a pod logs into: the three opt-in routes of docs/operator.md, in precedence order.

Pure functions over what the webhook's caches hold (PlutoRuns and namespace labels), so the
decision for a pod is testable without a cluster and costs no API call at admission time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pluto_operator.model import PlutoRun, SidecarSpec
from pluto_operator.names import (
    ANNOTATION_PROJECT,
    INJECT_DISABLED,
    INJECT_ENABLED,
    JOBSET_NAME_LABEL,
    LABEL_INJECT,
    LABEL_RUN,
)
from pluto_operator.selectors import selector_matches
from pluto_operator.settings import OperatorSettings, SecretRef

Route = Literal["label", "selector", "namespace"]


@dataclass(frozen=True)
class KnownRun:
    """A PlutoRun as the webhook's cache keeps it."""

    name: str
    namespace: str
    #: metadata.creationTimestamp (RFC 3339 sorts as text): the oldest of several matches wins.
    created: str
    run: PlutoRun


@dataclass(frozen=True)
class NamespaceInfo:
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    """What the webhook injects into one pod."""

    route: Route
    #: The PlutoRun that covers the pod (namespace route: the one named after the JobSet,
    #: which the reconciler creates if it does not exist yet).
    plutorun: str
    run_id: str
    project: str
    server_url: str
    api_key_secret: SecretRef
    sidecar: SidecarSpec | None = None


@dataclass
class Decision:
    binding: Binding | None
    #: Said to whoever created the pod (admission warnings), and logged.
    warnings: list[str] = field(default_factory=list)


def _labels(pod: Mapping[str, Any]) -> dict[str, str]:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _binding(route: Route, known: KnownRun, settings: OperatorSettings) -> Binding:
    spec = known.run.spec
    server = spec.server
    secret = settings.api_key_secret
    if server is not None and server.api_key_secret_ref is not None:
        secret = SecretRef(server.api_key_secret_ref.name, server.api_key_secret_ref.key)
    return Binding(
        route=route,
        plutorun=known.name,
        run_id=known.run.run_id,
        project=spec.project,
        server_url=(server.url if server is not None and server.url else settings.server_url),
        api_key_secret=secret,
        sidecar=spec.sidecar,
    )


def namespace_project(namespace: str, info: NamespaceInfo, settings: OperatorSettings) -> str:
    """Project of namespace-mode runs: annotation, else ``--default-project``, else the name."""
    return info.annotations.get(ANNOTATION_PROJECT) or settings.default_project or namespace


def decide(
    pod: Mapping[str, Any],
    namespace: str,
    namespace_info: NamespaceInfo | None,
    runs: Iterable[KnownRun],
    settings: OperatorSettings,
) -> Decision:
    """The binding for ``pod`` in ``namespace``, or none, with what the pod's creator should know.

    ``runs`` are the PlutoRuns of the pod's namespace (others are ignored: a selector never
    reaches across namespaces, and Secrets could not either).
    """
    labels = _labels(pod)
    if labels.get(LABEL_INJECT) == INJECT_DISABLED:
        return Decision(None)
    local = sorted((r for r in runs if r.namespace == namespace), key=lambda r: r.created)

    named = labels.get(LABEL_RUN)
    if named is not None:
        for known in local:
            if known.name == named:
                return Decision(_binding("label", known, settings))
        # The label is an explicit request: a PlutoRun created a moment later than its pods is
        # the usual cause, so say what to do rather than guessing a project.
        return Decision(None, [
            f"pluto: no PlutoRun {named!r} in namespace {namespace!r}: the pod runs without "
            f"the pluto sidecar; create the PlutoRun before the pods that name it "
            f"(label {LABEL_RUN}={named})"
        ])

    matching = [r for r in local if selector_matches(r.run.spec.selector, labels)]
    if matching:
        decision = Decision(_binding("selector", matching[0], settings))
        if len(matching) > 1:
            others = ", ".join(r.name for r in matching[1:])
            decision.warnings.append(
                f"pluto: the selectors of several PlutoRuns match this pod; it logs into the "
                f"oldest, {matching[0].name!r} (also matching: {others}); narrow their selectors"
            )
        return decision

    jobset = labels.get(JOBSET_NAME_LABEL)
    if (
        jobset is not None
        and namespace_info is not None
        and namespace_info.labels.get(LABEL_INJECT) == INJECT_ENABLED
    ):
        return Decision(Binding(
            route="namespace",
            plutorun=jobset,
            run_id=jobset,
            project=namespace_project(namespace, namespace_info, settings),
            server_url=settings.server_url,
            api_key_secret=settings.api_key_secret,
        ))
    return Decision(None)
