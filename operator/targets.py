"""Which run a pod logs into: the three opt-in routes of docs/operator.md, in precedence order.

Pure functions over what the webhook's caches hold (PlutoRuns and namespace labels), so the
decision for a pod is testable without a cluster and costs no API call at admission time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pluto_operator.model import PROJECT_NAME_PATTERN, ForkSpec, PlutoRun, SidecarSpec
from pluto_operator.names import (
    ANNOTATION_PROJECT,
    INJECT_DISABLED,
    INJECT_ENABLED,
    JOBSET_NAME_LABEL,
    LABEL_INJECT,
    LABEL_RUN,
    label_value,
)
from pluto_operator.selectors import selector_matches
from pluto_operator.settings import OperatorSettings, SecretRef

logger = logging.getLogger("pluto.operator.targets")

Route = Literal["label", "selector", "namespace"]


@dataclass(frozen=True)
class KnownRun:
    """A PlutoRun as the webhook's cache keeps it."""

    name: str
    namespace: str
    #: metadata.creationTimestamp (RFC 3339 sorts as text): the oldest of several matches wins
    #: (ties, within its one-second resolution, go to the first name).
    created: str
    run: PlutoRun
    #: ``status.runId``, once the reconciler opened the run: what pods get from then on, even if
    #: ``spec.runId`` was edited since (the CRD refuses such edits; objects stored before it
    #: did, or edits adding a runId that was absent, remain).
    status_run_id: str | None = None
    #: ``status.project``, likewise.
    status_project: str | None = None
    #: None while the run is not open; once it is, whether the server made it a fork
    #: (``status.forkedFrom``).
    status_forked: bool | None = None

    @property
    def run_id(self) -> str:
        """The run id the pods share: the opened run's, else the spec's (or the name)."""
        return self.status_run_id or self.run.run_id

    @property
    def project(self) -> str:
        """The project the pods log into: the opened run's, else the spec's."""
        return self.status_project or self.run.spec.project

    @property
    def fork(self) -> ForkSpec | None:
        """The fork the pods are told to open their run as (``PLUTO_FORK_*``), if any.

        None once the run is open without a fork: a fork added to the spec afterwards cannot
        apply to it, and naming one would make the server refuse the pods' attach.
        """
        if self.status_forked is False:
            return None
        return self.run.spec.fork


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
    #: The run the pods' run is a fork of, and the step: given to the pods as
    #: ``PLUTO_FORK_RUN_ID`` / ``PLUTO_FORK_STEP`` so that whichever process opens the run
    #: first (a rank's ``pluto.init()`` may beat the reconciler) opens it as the fork.
    fork_run_id: str | None = None
    fork_step: int | None = None
    #: ``PLUTO_FORK_INHERIT_CONFIG`` / ``PLUTO_FORK_INHERIT_TAGS``: the spec's, so that the run
    #: is the same fork whoever opens it.
    fork_inherit_config: bool = True
    fork_inherit_tags: bool = False


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
    fork = known.fork
    return Binding(
        route=route,
        plutorun=known.name,
        run_id=known.run_id,
        project=known.project,
        server_url=(server.url if server is not None and server.url else settings.server_url),
        api_key_secret=secret,
        sidecar=spec.sidecar,
        fork_run_id=fork.run_id if fork is not None else None,
        fork_step=fork.step if fork is not None else None,
        fork_inherit_config=fork.inherit_config if fork is not None else True,
        fork_inherit_tags=fork.inherit_tags if fork is not None else False,
    )


def namespace_project_problem(namespace: str, info: NamespaceInfo) -> str | None:
    """What is wrong with the namespace's ``pluto.dev/project`` annotation, if anything.

    Annotations are free text; a project name is not (the server's and the CRD's pattern). An
    invalid one is ignored, as if absent, and this says what to change.
    """
    value = info.annotations.get(ANNOTATION_PROJECT)
    if value is None or value == "" or re.fullmatch(PROJECT_NAME_PATTERN, value):
        return None
    shown = value if len(value) <= 30 else value[:27] + "..."
    return (
        f"pluto: namespace {namespace}'s annotation {ANNOTATION_PROJECT}={shown!r} is not a "
        f"project name (letters, digits, . _ -) and is ignored: kubectl annotate ns "
        f"{namespace} --overwrite {ANNOTATION_PROJECT}=my-project"
    )


def namespace_project(namespace: str, info: NamespaceInfo, settings: OperatorSettings) -> str:
    """Project of namespace-mode runs: annotation, else ``--default-project``, else the name.

    An annotation that is not a valid project name counts as absent
    (``namespace_project_problem`` says so).
    """
    annotated = info.annotations.get(ANNOTATION_PROJECT)
    if annotated and namespace_project_problem(namespace, info) is None:
        return annotated
    return settings.default_project or namespace


def watched(namespace: str, settings: OperatorSettings) -> bool:
    """Whether the operator watches ``namespace`` (``--namespace``; none given: all)."""
    return not settings.namespaces or namespace in settings.namespaces


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
    if not watched(namespace, settings):
        # No reconciler opens or finishes runs there, and no PlutoRun of it is cached.
        return Decision(None)
    # By name after the time: every webhook replica picks the same one of two PlutoRuns
    # created within the same second, whatever order its cache lists them in.
    local = sorted((r for r in runs if r.namespace == namespace),
                   key=lambda r: (r.created, r.name))

    named = labels.get(LABEL_RUN)
    if named is not None:
        for known in local:
            # A name too long for a label value is written as its label_value.
            if named in (known.name, label_value(known.name)):
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
        problem = namespace_project_problem(namespace, namespace_info)
        return Decision(Binding(
            route="namespace",
            plutorun=jobset,
            run_id=jobset,
            project=namespace_project(namespace, namespace_info, settings),
            server_url=settings.server_url,
            api_key_secret=settings.api_key_secret,
        ), [problem] if problem is not None else [])
    return Decision(None)
