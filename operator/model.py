"""The PlutoRun custom resource as pydantic models: the one source of truth for its schema.

``crds/plutorun.yaml`` is generated from these classes (``pluto_operator.crd``), so what the
API server accepts and what the operator parses cannot drift apart. That sets two rules here:

- every check a model makes must be expressible in a Kubernetes structural OpenAPI schema
  (types, enums, patterns, bounds, required fields, defaults); a model-only check would let the
  API server store an object that the operator then cannot read;
- attribute docstrings become the field descriptions that ``kubectl explain plutorun.spec``
  shows, so they are written for the user of the resource, not for the Python reader.

Field names on the wire are the Kubernetes camelCase ones (``runId``); Python attributes are
snake_case (``run_id``). Only the wire names are accepted as input, as the API server would:
``PlutoRunSpec(runId="x", ...)``, or ``PlutoRunSpec.model_validate(body["spec"])``. Unknown
fields are rejected (``extra="forbid"``), which the CRD mirrors: its structural schema makes the
API server reject them under server-side field validation ``Strict``, the default of
``kubectl apply`` and ``kubectl create``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

GROUP: Final = "pluto.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "pluto.dev/v1alpha1"  # GROUP/VERSION, spelled out for Literal types
KIND: Final = "PlutoRun"
PLURAL: Final = "plutoruns"
SINGULAR: Final = "plutorun"
SHORT_NAMES: Final = ("prun",)
CATEGORIES: Final = ("pluto",)

# Same rules as the tracking server (pluto_server.naming), so a PlutoRun the API server accepts
# never fails on the server for its name. Kept literal here: the operator does not depend on the
# server package; tests/test_crd.py pins the two copies together.
PROJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"

# Kubernetes' own patterns (apimachinery), as controller-gen writes them into CRDs.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
URL_PATTERN = r"^https?://[^\s/?#]+[^\s]*$"

ProjectName = Annotated[str, StringConstraints(pattern=PROJECT_NAME_PATTERN)]
RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN)]

Quantity = Annotated[
    int | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)],
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity: ``2``, ``"500m"``, ``"2Gi"``. Kept as given (not parsed)."""

FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""Any JSON object, stored as given: the API server keeps unknown fields under it."""


def _timestamp_input(value: object) -> object:
    # Strict mode is off for timestamps only to parse strings; other types stay refused.
    if not isinstance(value, str | datetime):
        raise ValueError("a timestamp is an RFC 3339 string, e.g. 2024-05-01T12:00:00Z")
    return value


Timestamp = Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_timestamp_input)]
"""An RFC 3339 time with a UTC offset (metav1.Time); naive times are refused."""

def immutable(field: str) -> dict[str, Any]:
    """A CEL transition rule: the API server refuses an update that changes ``field``.

    A run's identity (project, run id, fork) is fixed once it exists: pods of one job created
    before and after such an edit would log into two runs. Kubernetes evaluates ``oldSelf``
    rules only when the field is set in both the old and the new object.
    """
    return {"x-kubernetes-validations": [{
        "rule": "self == oldSelf",
        "message": f"spec.{field} cannot change once the PlutoRun exists (a run's identity is "
                   "fixed): create a new PlutoRun instead",
    }]}


Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class _Model(BaseModel):
    """Shared configuration: camelCase on the wire; unknown fields and wrong JSON types rejected.

    ``strict``: no coercion (``"5"`` is not an integer), as the API server's schema validation
    does not coerce either. Timestamps are the one exception: they arrive as RFC 3339 strings.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """The Kubernetes form: camelCase keys, JSON types, only the fields that were set.

        Only set fields, so that a status built for a patch carries what changed and nothing
        else (an empty ``conditions`` default would otherwise wipe the stored ones), and a parsed
        object turns back into the body it came from.
        """
        return self.model_dump(mode="json", exclude_unset=True)


class ForkSpec(_Model):
    """Start this run as a fork of another run of the same project at a step."""

    run_id: RunId = Field(alias="runId")
    """Run id of the parent run."""
    step: int = Field(ge=0)
    """The parent's steps up to and including this one belong to the lineage; this run logs
    the steps after it."""
    inherit_config: bool = Field(default=True, alias="inheritConfig")
    """Start from the parent's config (this run's config is merged over it)."""
    inherit_tags: bool = Field(default=False, alias="inheritTags")
    """Start from the parent's tags (this run's tags are added)."""


class LabelSelectorRequirement(_Model):
    """One set-based requirement of a label selector."""

    key: str
    """The label key the requirement applies to."""
    operator: SelectorOperator
    """How the label's value relates to the values: In, NotIn, Exists or DoesNotExist."""
    values: list[str] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-list-type": "atomic"}
    )
    """The values for In and NotIn (non-empty); empty for Exists and DoesNotExist."""


class LabelSelector(_Model):
    """A standard Kubernetes label selector; the requirements are ANDed."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-map-type": "atomic"})

    match_labels: dict[str, str] | None = Field(default=None, alias="matchLabels")
    """Labels a pod must carry with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None,
        alias="matchExpressions",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    """Set-based requirements a pod's labels must meet."""


class SecretKeyRef(_Model):
    """A key of a Secret in the PlutoRun's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of the Secret."""
    key: str = Field(max_length=253, pattern=SECRET_KEY_PATTERN)
    """Key within the Secret."""


class ServerSpec(_Model):
    """Which tracking server the run lives on; unset fields use the operator's defaults."""

    url: str | None = Field(default=None, pattern=URL_PATTERN)
    """Base URL of the Pluto server, e.g. http://pluto-server.pluto.svc:7300."""
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    """The Secret key holding the API key the pods' sidecars send; the training containers
    never see it. The operator opens and finishes runs with its own key (--api-key-file or
    PLUTO_API_KEY), which this server must accept too."""


class ResourceRequirements(_Model):
    """Compute resources of the sidecar container."""

    requests: dict[str, Quantity] | None = None
    """Minimum resources, e.g. {cpu: 50m, memory: 64Mi}."""
    limits: dict[str, Quantity] | None = None
    """Maximum resources, e.g. {memory: 256Mi}."""


class SidecarSpec(_Model):
    """Settings of the injected sidecar; unset fields use the operator's defaults."""

    image: str | None = Field(default=None, min_length=1)
    """Container image of the sidecar."""
    resources: ResourceRequirements | None = None
    """Requests and limits of the sidecar container."""
    spool_size: Quantity | None = Field(default=None, alias="spoolSize")
    """Most unsent data the sidecar spools before it slows the training down, e.g. 1Gi."""
    drain_seconds: int | None = Field(default=None, alias="drainSeconds", ge=1, le=3600)
    """Seconds the sidecar keeps sending spooled data after the pod is asked to stop."""


class PlutoRunSpec(_Model):
    """The run that the covered pods log into."""

    project: ProjectName = Field(json_schema_extra=immutable("project"))
    """Project of the run on the Pluto server. Cannot change."""
    run_id: RunId | None = Field(default=None, alias="runId",
                                 json_schema_extra=immutable("runId"))
    """Run id shared by every covered pod (PLUTO_RUN_ID). Defaults to the PlutoRun's name.
    Cannot change."""
    name: str | None = None
    """Display name of the run."""
    config: FreeForm = Field(default_factory=dict)
    """Run config (hyperparameters), any JSON object."""
    tags: list[str] = Field(default_factory=list)
    """Tags of the run."""
    fork: ForkSpec | None = Field(default=None, json_schema_extra=immutable("fork"))
    """Start the run as a fork of another run at a step. The operator forks once, on the
    server; the pods get PLUTO_FORK_RUN_ID and PLUTO_FORK_STEP too, so that the run is the
    fork whichever process opens it first. Cannot change."""
    selector: LabelSelector | None = None
    """Pods this run covers, e.g. matchLabels {jobset.sigs.k8s.io/jobset-name: my-job}. Pods
    labelled pluto.dev/run=<this PlutoRun's name> are covered too."""
    server: ServerSpec | None = None
    """The tracking server and its API key."""
    sidecar: SidecarSpec | None = None
    """Settings of the sidecar injected into covered pods."""


class Condition(_Model):
    """A standard Kubernetes status condition (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)
    """Condition type in CamelCase, e.g. Ready or ServerReachable."""
    status: ConditionStatus
    """True, False or Unknown."""
    observed_generation: int | None = Field(default=None, alias="observedGeneration", ge=0)
    """The metadata.generation this condition was set for."""
    last_transition_time: Timestamp = Field(alias="lastTransitionTime")
    """When the status last changed."""
    reason: str = Field(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)
    """Machine-readable CamelCase reason for the last transition."""
    message: str = Field(max_length=32768)
    """Human-readable details of the last transition; may be empty."""


class PlutoRunStatus(_Model):
    """What the operator observed and did; written by the operator only."""

    phase: Phase | None = None
    """Pending, Running, Succeeded or Failed."""
    run_id: RunId | None = Field(default=None, alias="runId")
    """The run id the pods log into."""
    project: ProjectName | None = None
    """The project of the run the pods log into."""
    server_run_id: int | None = Field(default=None, alias="serverRunId")
    """Numeric id of the run on the server."""
    display_id: str | None = Field(default=None, alias="displayId")
    """Per-project display id of the run, e.g. MMP-42."""
    url: str | None = None
    """Where to see the run in the Pluto web UI."""
    forked_from: int | None = Field(default=None, alias="forkedFrom")
    """Numeric id of the parent run as resolved by the server (the ancestor owning the fork
    step)."""
    fork_step: int | None = Field(default=None, alias="forkStep", ge=0)
    """Fork step as recorded by the server."""
    pods_injected: int | None = Field(default=None, alias="podsInjected", ge=0)
    """Pods the webhook has injected a sidecar into."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    """Latest observations of the run's state, one per type."""
    observed_generation: int | None = Field(default=None, alias="observedGeneration", ge=0)
    """The metadata.generation the operator last acted on."""


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; everything else is kept as given."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class PlutoRun(_Model):
    """A Pluto run shared by the pods it covers: every covered pod's sidecar logs into it."""

    api_version: Literal["pluto.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["PlutoRun"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PlutoRunSpec
    status: PlutoRunStatus | None = None

    @property
    def run_id(self) -> str:
        """The run id the pods share: ``spec.runId``, or else the PlutoRun's name.

        Raises ``ValueError`` when neither is usable (a name longer than a run id may be),
        saying to set ``spec.runId``.
        """
        if self.spec.run_id is not None:
            return self.spec.run_id
        name = self.metadata.name
        if name is None:
            raise ValueError("PlutoRun has neither spec.runId nor metadata.name")
        if re.fullmatch(RUN_ID_PATTERN, name) is None:
            raise ValueError(
                f"PlutoRun name {name!r} is not a valid run id (at most 128 characters): "
                "set spec.runId"
            )
        return name

    def to_dict(self) -> dict[str, Any]:
        """The manifest: like ``_Model.to_dict``, always with apiVersion and kind."""
        return {"apiVersion": self.api_version, "kind": self.kind, **super().to_dict()}
