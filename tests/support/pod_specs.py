"""Pods exactly as the API server hands them to a mutating webhook on CREATE.

The pluto webhook never sees a manifest a person wrote: it sees a pod that a controller built
from a template and that the API server has then defaulted and run through its built-in
admission plugins. Each builder here goes through those same steps, in order, so that the
webhook tests exercise what a cluster really sends:

1. the workload as its author (or tool) writes it: ``examples/job.yaml``, ``examples/jobset.yaml``,
   a Kubeflow PyTorchJob, or the JobSet that Konduktor renders from ``examples/konduktor-task.yaml``
   with Konduktor's own Jinja templates (``konduktor/templates/{pod,jobset}.yaml.j2``);
2. the controllers between it and the pod: the JobSet webhook's defaults and the JobSet
   controller's child Job, the Job API's generated selector labels, the Job controller's pod
   (``generateName``, completion index label/annotation, hostname, ``JOB_COMPLETION_INDEX``,
   tracking finalizer, owner reference), or the training-operator's pod (name, labels, env,
   init container);
3. the API server before webhooks: the namespace from the request path, the v1 defaults, and
   the default admission plugins that mutate pods (ServiceAccount, Priority,
   DefaultTolerationSeconds). Quantities come out in canonical form (``8.0`` -> ``"8"``), as
   the API server re-serialises them.

What a webhook sees and these pods do not carry: ``metadata.managedFields`` (written before
admission, but no webhook reads them) and whatever cluster-specific admission adds (LimitRanges,
Kueue's flavor assignment on Konduktor clusters, other webhooks). ``metadata.name`` is absent
for pods created with ``generateName``: the API server generates it after admission.

Everything is deterministic: UIDs are UUID5s of the object's identity, the token volume's random
suffix is a hash, and nothing reads the clock, the user or the host.

Konduktor: ``konduktor/__init__.py`` imports packages that are not installed (konduktor-nightly is
installed without its dependencies), so ``konduktor.backends`` cannot be imported. The templates are
rendered with jinja2 exactly as ``konduktor.utils.common_utils.fill_template`` does, with the
context dict that ``konduktor.backends.pod_utils.create_pod_spec`` and
``konduktor.backends.jobset_utils.create_jobset`` pass, rebuilt here; Konduktor's dependency-free
modules (its constants and accelerator registry) are loaded from their files for the values.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import jinja2
import yaml

Pod = dict[str, Any]
Manifest = dict[str, Any]

ROOT: Final = Path(__file__).resolve().parents[2]
EXAMPLES: Final = ROOT / "examples"
JOB_EXAMPLE: Final = EXAMPLES / "job.yaml"
JOBSET_EXAMPLE: Final = EXAMPLES / "jobset.yaml"
KONDUKTOR_EXAMPLE: Final = EXAMPLES / "konduktor-task.yaml"

#: The namespace of examples/plutorun.yaml.
NAMESPACE: Final = "ml"

# -- label and annotation keys, as the controllers spell them ----------------------------------

JOB_NAME_LABEL: Final = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME_LABEL: Final = "job-name"
CONTROLLER_UID_LABEL: Final = "batch.kubernetes.io/controller-uid"
LEGACY_CONTROLLER_UID_LABEL: Final = "controller-uid"
#: Both an annotation and (PodIndexLabel, on by default since Kubernetes 1.28) a label.
COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
JOB_TRACKING_FINALIZER: Final = "batch.kubernetes.io/job-tracking"

JOBSET_NAME: Final = "jobset.sigs.k8s.io/jobset-name"
JOBSET_REPLICATED_JOB_NAME: Final = "jobset.sigs.k8s.io/replicatedjob-name"
JOBSET_RESTART_ATTEMPT: Final = "jobset.sigs.k8s.io/restart-attempt"
JOBSET_REPLICATED_JOB_REPLICAS: Final = "jobset.sigs.k8s.io/replicatedjob-replicas"
JOBSET_GLOBAL_REPLICAS: Final = "jobset.sigs.k8s.io/global-replicas"
JOBSET_JOB_INDEX: Final = "jobset.sigs.k8s.io/job-index"
JOBSET_JOB_KEY: Final = "jobset.sigs.k8s.io/job-key"
JOBSET_JOB_GLOBAL_INDEX: Final = "jobset.sigs.k8s.io/job-global-index"

KUBEFLOW_JOB_NAME: Final = "training.kubeflow.org/job-name"
KUBEFLOW_OPERATOR_NAME: Final = "training.kubeflow.org/operator-name"
KUBEFLOW_REPLICA_TYPE: Final = "training.kubeflow.org/replica-type"
KUBEFLOW_REPLICA_INDEX: Final = "training.kubeflow.org/replica-index"
KUBEFLOW_JOB_ROLE: Final = "training.kubeflow.org/job-role"

SERVICE_ACCOUNT_MOUNT: Final = "/var/run/secrets/kubernetes.io/serviceaccount"


# -- small helpers -------------------------------------------------------------------------------


def _uid(kind: str, namespace: str, name: str) -> str:
    """A stable stand-in for the UID the API server would assign to this object."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pluto-k8s-tests/{kind}/{namespace}/{name}"))


def _load_yaml_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _document(path: Path, kind: str) -> Manifest:
    """The one document of ``kind`` in a multi-document example file."""
    found = [doc for doc in _load_yaml_documents(path) if doc.get("kind") == kind]
    if len(found) != 1:
        raise ValueError(f"{path.name}: expected one {kind}, found {len(found)}")
    return found[0]


def _controller_ref(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    # metav1.NewControllerRef: the owner is the controller and blocks foreground deletion.
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# -- quantities: the API server re-serialises them in canonical form ---------------------------

_BINARY: Final = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL: Final = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15,
                   "E": 18}
_QUANTITY_RE: Final = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([a-zA-Z]*)$")


def canonical_quantity(value: int | float | str) -> str:
    """A resource quantity as ``resource.Quantity`` marshals it: ``8.0`` -> ``"8"``,
    ``"32.0Gi"`` -> ``"32Gi"``, ``0.5`` -> ``"500m"``, ``4000`` -> ``"4k"``.

    Binary suffixes stay binary when the value is a whole number of at least 1024 (the largest
    unit that divides it exactly); everything else is decimal, with the largest SI exponent
    that keeps the mantissa whole. Exponent notation (``1e3``) is not needed here.
    """
    match = _QUANTITY_RE.match(str(value).strip())
    if match is None:
        raise ValueError(f"not a quantity this helper handles: {value!r}")
    number, suffix = match.groups()
    if suffix in _BINARY:
        amount = Fraction(number) * 2 ** _BINARY[suffix]
        binary = True
    elif suffix in _DECIMAL:
        amount = Fraction(number) * Fraction(10) ** _DECIMAL[suffix]
        binary = False
    else:
        raise ValueError(f"unknown quantity suffix {suffix!r} in {value!r}")
    if amount == 0:
        return "0"
    if binary and abs(amount) >= 1024 and amount.denominator == 1:
        whole, power = int(amount), 0
        while power < 60 and whole % 1024 == 0:
            whole, power = whole // 1024, power + 10
        names = {bits: name for name, bits in _BINARY.items()}
        return f"{whole}{names.get(power, '')}"
    # Values finer than a nano are rounded up by the API server; none occur here.
    for exponent in (18, 15, 12, 9, 6, 3, 0, -3, -6, -9):
        mantissa = amount / Fraction(10) ** exponent
        if mantissa.denominator == 1:
            names = {power: name for name, power in _DECIMAL.items()}
            return f"{int(mantissa)}{names[exponent]}"
    raise ValueError(f"quantity finer than 1n: {value!r}")


# -- the API server: defaults and the built-in admission plugins that run before webhooks -------


def _image_pull_policy(image: str) -> str:
    # SetDefaults_Container: Always for ":latest" or no tag (which means latest), else
    # IfNotPresent. A digest pins the image, so no tag is needed then.
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def _default_probe(probe: dict[str, Any]) -> None:
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    if "httpGet" in probe:
        probe["httpGet"].setdefault("scheme", "HTTP")


def _default_resources(resources: dict[str, Any]) -> None:
    for kind in ("limits", "requests"):
        if kind in resources:
            resources[kind] = {k: canonical_quantity(v) for k, v in resources[kind].items()}
    # SetDefaults_Pod: a limit without a request requests the limit.
    limits = resources.get("limits") or {}
    if limits:
        requests = resources.setdefault("requests", {})
        for name, amount in limits.items():
            requests.setdefault(name, amount)


def _default_container(container: dict[str, Any]) -> None:
    container.setdefault("imagePullPolicy", _image_pull_policy(container.get("image", "")))
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    # Not defaulted, but ResourceRequirements is a struct, not a pointer: it always serialises.
    _default_resources(container.setdefault("resources", {}))
    for port in container.get("ports") or []:
        port.setdefault("protocol", "TCP")
    for env in container.get("env") or []:
        field_ref = (env.get("valueFrom") or {}).get("fieldRef")
        if field_ref is not None:
            field_ref.setdefault("apiVersion", "v1")
    for name in ("livenessProbe", "readinessProbe", "startupProbe"):
        if name in container:
            _default_probe(container[name])


def _default_volume(volume: dict[str, Any]) -> None:
    for source in ("secret", "configMap", "projected"):
        if source in volume:
            volume[source].setdefault("defaultMode", 0o644)
    empty_dir = volume.get("emptyDir")
    if empty_dir is not None and "sizeLimit" in empty_dir:
        empty_dir["sizeLimit"] = canonical_quantity(empty_dir["sizeLimit"])


def _default_pod(pod: Pod) -> None:
    """The v1 defaults (pkg/apis/core/v1/defaults.go) for the fields these pods use."""
    spec = pod["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        _default_container(container)
    for volume in spec.get("volumes") or []:
        _default_volume(volume)


def _token_volume_name(pod: Pod) -> str:
    # The ServiceAccount plugin names the volume kube-api-access-<5 random characters from
    # the API server's name alphabet>; here the characters come from the pod's identity.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    meta = pod["metadata"]
    identity = f"{meta['namespace']}/{meta.get('name') or meta.get('generateName')}"
    digest = hashlib.sha256(identity.encode()).digest()
    return "kube-api-access-" + "".join(alphabet[b % len(alphabet)] for b in digest[:5])


def _service_account_admission(pod: Pod) -> None:
    """plugin/pkg/admission/serviceaccount: the default account and its projected token."""
    spec = pod["spec"]
    spec.setdefault("serviceAccountName", "default")
    # The deprecated field mirrors the name in v1 (conversion from the internal type).
    spec["serviceAccount"] = spec["serviceAccountName"]
    if spec.get("automountServiceAccountToken") is False:
        return
    name = _token_volume_name(pod)
    spec.setdefault("volumes", []).append(
        {
            "name": name,
            "projected": {
                "defaultMode": 0o644,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {
                                        "apiVersion": "v1",
                                        "fieldPath": "metadata.namespace",
                                    },
                                }
                            ]
                        }
                    },
                ],
            },
        }
    )
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        container.setdefault("volumeMounts", []).append(
            {"name": name, "readOnly": True, "mountPath": SERVICE_ACCOUNT_MOUNT}
        )


def _priority_admission(pod: Pod) -> None:
    # plugin/pkg/admission/priority with no PriorityClass marked globalDefault.
    spec = pod["spec"]
    if "priorityClassName" not in spec:
        spec["priority"] = 0
        spec["preemptionPolicy"] = "PreemptLowerPriority"


def _default_toleration_seconds(pod: Pod) -> None:
    # plugin/pkg/admission/defaulttolerationseconds: 300 s on not-ready and unreachable nodes.
    tolerations = pod["spec"].setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key and t.get("effect") in (None, "NoExecute")
                   for t in tolerations):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )


def admitted(pod: Pod, namespace: str) -> Pod:
    """What a mutating webhook receives for ``pod`` created in ``namespace``."""
    pod = copy.deepcopy(pod)
    pod["apiVersion"] = "v1"
    pod["kind"] = "Pod"
    pod["metadata"]["namespace"] = namespace  # from the request path
    _default_pod(pod)
    _service_account_admission(pod)
    _priority_admission(pod)
    _default_toleration_seconds(pod)
    pod["status"] = {}  # a create carries an empty status; the API server clears it anyway
    return {key: pod[key] for key in ("apiVersion", "kind", "metadata", "spec", "status")}


# -- the Job API and the Job controller ---------------------------------------------------------


def _created_job(job: Manifest, namespace: str) -> Manifest:
    """The Job as stored: a UID, and (no manualSelector) the generated selector labels on
    its pod template (pkg/registry/batch/job/strategy.go, generateSelector)."""
    job = copy.deepcopy(job)
    meta = job["metadata"]
    meta["namespace"] = namespace
    meta["uid"] = _uid("Job", namespace, meta["name"])
    labels = job["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {})
    for key in (LEGACY_JOB_NAME_LABEL, JOB_NAME_LABEL):
        labels.setdefault(key, meta["name"])
    for key in (LEGACY_CONTROLLER_UID_LABEL, CONTROLLER_UID_LABEL):
        labels.setdefault(key, meta["uid"])
    return job


def _indexed_job_pod(job: Manifest, index: int) -> Pod:
    """The pod of completion ``index`` that the Job controller posts (pkg/controller/job:
    manageJob, then CreatePodsWithGenerateName)."""
    spec = job["spec"]
    if spec.get("completionMode") != "Indexed":
        raise ValueError(f"Job {job['metadata']['name']} is not Indexed")
    if not 0 <= index < spec["completions"]:
        raise ValueError(f"index {index} outside 0..{spec['completions'] - 1}")
    name = job["metadata"]["name"]
    template = copy.deepcopy(spec["template"])
    pod_spec = template["spec"]
    # addCompletionIndexEnvVariables: every container, unless it already sets the variable.
    # Current controllers point it at the index label (PodIndexLabel: the label exists since
    # 1.28); older ones at the annotation, which every Indexed pod carries as well.
    for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        env = container.setdefault("env", [])
        if not any(e["name"] == "JOB_COMPLETION_INDEX" for e in env):
            field_ref = {"fieldPath": f"metadata.labels['{COMPLETION_INDEX}']"}
            env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": field_ref}})
    meta = template.setdefault("metadata", {})
    meta.setdefault("annotations", {})[COMPLETION_INDEX] = str(index)
    meta.setdefault("labels", {})[COMPLETION_INDEX] = str(index)
    pod_spec["hostname"] = f"{name}-{index}"
    finalizers = meta.get("finalizers", [])
    if JOB_TRACKING_FINALIZER not in finalizers:
        finalizers = [*finalizers, JOB_TRACKING_FINALIZER]
    # controller.GetPodFromTemplate: labels, annotations and finalizers of the template; no name.
    return {
        "metadata": {
            "generateName": f"{name}-{index}-",
            "labels": dict(meta["labels"]),
            "annotations": dict(meta["annotations"]),
            "finalizers": finalizers,
            "ownerReferences": [
                _controller_ref("batch/v1", "Job", name, job["metadata"]["uid"])
            ],
        },
        "spec": pod_spec,
    }


def job_pod(job: Manifest, index: int, namespace: str = NAMESPACE) -> Pod:
    """The admitted pod of completion ``index`` of an Indexed Job manifest."""
    return admitted(_indexed_job_pod(_created_job(job, namespace), index), namespace)


def indexed_job_pod(index: int = 0, namespace: str = NAMESPACE) -> Pod:
    """Pod ``index`` of the Job in ``examples/job.yaml`` (label route: ``pluto.dev/run``)."""
    return job_pod(_document(JOB_EXAMPLE, "Job"), index, namespace)


def pod_with_run_id(
    run_id: str = "preset-run-7", index: int = 0, namespace: str = NAMESPACE
) -> Pod:
    """Pod ``index`` of ``examples/job.yaml``'s Job whose author already set ``PLUTO_RUN_ID``
    in the container's env: the webhook must keep that value."""
    job = _document(JOB_EXAMPLE, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    container.setdefault("env", []).append({"name": "PLUTO_RUN_ID", "value": run_id})
    return job_pod(job, index, namespace)


# -- JobSet: its webhook's defaults and its controller's child Jobs ----------------------------


def _jobset_defaults(jobset: Manifest) -> Manifest:
    """The JobSet webhook's Default (pkg/webhooks/jobset_webhook.go)."""
    jobset = copy.deepcopy(jobset)
    spec = jobset["spec"]
    spec.setdefault("successPolicy", {"operator": "All"})
    spec.setdefault("startupPolicy", {"startupPolicyOrder": "AnyOrder"})
    for rjob in spec["replicatedJobs"]:
        rjob.setdefault("replicas", 1)
        job_spec = rjob["template"]["spec"]
        job_spec.setdefault("completionMode", "Indexed")
        job_spec["template"]["spec"].setdefault("restartPolicy", "OnFailure")
    network = spec.setdefault("network", {})
    network.setdefault("enableDNSHostnames", True)
    network.setdefault("publishNotReadyAddresses", True)
    return jobset


def _jobset_child_job(jobset: Manifest, rjob_name: str, job_index: int, namespace: str) -> Manifest:
    """The Job the JobSet controller creates (constructJob and labelAndAnnotateObject in
    pkg/controllers/jobset_controller.go): JobSet labels and annotations on the Job and on its
    pod template, the headless Service's name as the pods' subdomain."""
    name = jobset["metadata"]["name"]
    rjobs = jobset["spec"]["replicatedJobs"]
    position = [r["name"] for r in rjobs].index(rjob_name)
    rjob = rjobs[position]
    job_name = f"{name}-{rjob_name}-{job_index}"
    restarts = jobset.get("status", {}).get("restarts", 0)
    global_index = sum(r["replicas"] for r in rjobs[:position]) + job_index
    marks = {
        JOBSET_NAME: name,
        JOBSET_REPLICATED_JOB_NAME: rjob_name,
        JOBSET_RESTART_ATTEMPT: str(restarts),
        JOBSET_REPLICATED_JOB_REPLICAS: str(rjob["replicas"]),
        JOBSET_GLOBAL_REPLICAS: str(sum(r["replicas"] for r in rjobs)),
        JOBSET_JOB_INDEX: str(job_index),
        JOBSET_JOB_KEY: hashlib.sha1(f"{namespace}/{job_name}".encode()).hexdigest(),
        JOBSET_JOB_GLOBAL_INDEX: str(global_index),
    }
    template_meta = rjob["template"].get("metadata") or {}
    job: Manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name,
            "labels": {**(template_meta.get("labels") or {}), **marks},
            "annotations": {**(template_meta.get("annotations") or {}), **marks},
            "ownerReferences": [
                _controller_ref(
                    "jobset.x-k8s.io/v1alpha2", "JobSet", name, _uid("JobSet", namespace, name)
                )
            ],
        },
        "spec": copy.deepcopy(rjob["template"]["spec"]),
    }
    pod_meta = job["spec"]["template"].setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **marks}
    pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **marks}
    if jobset["spec"]["network"]["enableDNSHostnames"]:
        subdomain = jobset["spec"]["network"].get("subdomain") or name
        job["spec"]["template"]["spec"]["subdomain"] = subdomain
    job["spec"]["suspend"] = bool(jobset["spec"].get("suspend", False))
    return job


def pod_of_jobset(
    jobset: Manifest,
    index: int = 0,
    *,
    replicated_job: str | None = None,
    job_index: int = 0,
    namespace: str = NAMESPACE,
) -> Pod:
    """The admitted pod of completion ``index`` in Job ``job_index`` of a replicated job
    (default: the first) of a JobSet manifest."""
    jobset = _jobset_defaults(jobset)
    rjob_name = replicated_job or jobset["spec"]["replicatedJobs"][0]["name"]
    job = _jobset_child_job(jobset, rjob_name, job_index, namespace)
    return job_pod(job, index, namespace)


def jobset_pod(index: int = 0, *, job_index: int = 0, namespace: str = NAMESPACE) -> Pod:
    """Pod ``index`` of the JobSet in ``examples/jobset.yaml`` (selector route)."""
    return pod_of_jobset(
        _document(JOBSET_EXAMPLE, "JobSet"), index, job_index=job_index, namespace=namespace
    )


# -- Konduktor ------------------------------------------------------------------------------------


@cache
def _konduktor_dir() -> Path:
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("konduktor")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("konduktor-nightly is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _konduktor_file_module(relative: str) -> ModuleType:
    """A dependency-free konduktor module, loaded from its file so that the package's
    ``__init__`` (which needs konduktor's missing dependencies) never runs."""
    path = _konduktor_dir() / relative
    name = "_konduktor_" + relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _konduktor_constant(relative: str, name: str) -> Any:
    return getattr(_konduktor_file_module(relative), name)


def konduktor_template(name: str) -> str:
    """The text of one of Konduktor's installed templates (``pod.yaml.j2``, ``jobset.yaml.j2``)."""
    return (_konduktor_dir() / "templates" / name).read_text(encoding="utf-8")


def _render(template: str, context: Mapping[str, Any]) -> Manifest:
    # As konduktor.utils.common_utils.fill_template: a bare jinja2.Template, then YAML.
    rendered = jinja2.Template(konduktor_template(template)).render(**context)
    loaded = yaml.safe_load(rendered)
    if not isinstance(loaded, dict):
        raise ValueError(f"{template} did not render to a mapping")
    return loaded


def _accelerators(value: str | Mapping[str, int] | None) -> dict[str, int] | None:
    # konduktor.resource.Resources._set_accelerators: "H100:8" -> {"H100": 8}, canonical names.
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        value = {parts[0]: int(float(parts[1]))} if len(parts) == 2 else {value: 1}
    canonicalize = _konduktor_constant(
        "utils/accelerator_registry.py", "canonicalize_accelerator_name"
    )
    return {str(canonicalize(name)): int(count) for name, count in value.items()}


def _parse_cpus(cpus: str) -> float | int:
    # konduktor.utils.kubernetes_utils.parse_cpu_or_gpu_resource
    if cpus.endswith("m"):
        return math.ceil(int(cpus[:-1]) / 1000)
    return float(cpus)


def _parse_memory_gib(memory: str) -> float:
    # konduktor.utils.kubernetes_utils.parse_memory_resource with unit "B": the number the
    # template writes before "Gi" (a bare task value is taken as GiB).
    units = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
    try:
        return int(memory) / units["B"]
    except ValueError:
        number, unit = re.sub(r"([KMGTPB]+)", r" \1", memory).split()
        return float(number) * units[unit[0]] / units["B"]


def konduktor_task(path: Path = KONDUKTOR_EXAMPLE) -> Manifest:
    """A Konduktor task YAML, as ``konduktor launch`` reads it."""
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a task is a mapping")
    return loaded


def konduktor_jobset(
    task_name: str | None = None,
    num_nodes: int | None = None,
    *,
    suffix: str = "3f9a",
    task: Mapping[str, Any] | None = None,
    envs: Mapping[str, str] | None = None,
    resources: Mapping[str, Any] | None = None,
    user: str = "alice",
    user_hash: str = "alice-9c1e",
) -> Manifest:
    """The JobSet ``konduktor launch`` posts for a task (default: examples/konduktor-task.yaml).

    ``suffix`` stands for the 4 hex characters Konduktor appends to the task name
    (``create_pod_spec``: ``task.name = f'{task.name}-{usage_run_id[:4]}'``); the result is the
    JobSet's name and the ``job_name`` of both templates. ``resources`` overrides keys of the
    task's ``resources`` (``{"accelerators": None}`` makes a CPU task); ``envs`` are the task's
    ``envs`` (``konduktor launch --env``). No ``~/.konduktor/config.yaml``, no secrets, no
    tailscale, no ssh: the defaults of a fresh Konduktor client.
    """
    task = dict(task if task is not None else konduktor_task())
    res = {**task.get("resources", {}), **(resources or {})}
    name = f"{task_name or task['name']}-{suffix}"
    nodes = num_nodes if num_nodes is not None else int(task.get("num_nodes", 1))
    task_envs = {str(k): str(v) for k, v in {**task.get("envs", {}), **(envs or {})}.items()}
    accelerators = _accelerators(res.get("accelerators"))
    accelerator_type = next(iter(accelerators)) if accelerators else None
    num_gpus = accelerators[accelerator_type] if accelerators and accelerator_type else 0
    labels = {str(k): str(v) for k, v in (res.get("labels") or {}).items()}
    job_config = res.get("job_config") or {}
    remote_workdir = _konduktor_constant("constants.py", "KONDUKTOR_REMOTE_WORKDIR")
    amd = _konduktor_constant("utils/accelerator_registry.py", "AMD_ACCELERATORS")
    profile = None
    if accelerator_type and num_gpus >= 1:
        normalized = re.sub(r"[^a-z0-9-]+", "-", accelerator_type.strip().lower()).strip("-")
        profile = f"{normalized}-{num_gpus}" if normalized else None

    # pod_utils.create_pod_spec's context for pod.yaml.j2.
    pod_context: dict[str, Any] = {
        "cpu": _parse_cpus(str(res["cpus"])),
        "memory": _parse_memory_gib(str(res["memory"])),
        "image_id": str(res["image_id"]).strip(),
        "num_gpus": num_gpus,
        "master_addr": f"{name}-workers-0-0.{name}",
        "num_nodes": nodes,
        "job_name": name,
        "setup_cmd": task.get("setup") or "",
        "run_cmd": task.get("run") or "",
        "node_hostnames": ",".join(f"{name}-workers-0-{i}.{name}" for i in range(nodes)),
        "accelerator_type": accelerator_type,
        "accelerator_profile": profile,
        "gpu_resource_key": "amd.com/gpu" if accelerator_type in amd else "nvidia.com/gpu",
        "sync_commands": [],
        "mkdir_commands": [],
        "mount_secrets": {},
        "remote_workdir": remote_workdir,
        "user": user,
        "tailscale_secret": None,
        "enable_ssh": False,
        "secret_name": None,
        "skip_apt": False,
        "serving": False,
        "general": True,
        "ports": None,
        "probe": None,
        "konduktor_ssh_port": _konduktor_constant("backends/constants.py", "KONDUKTOR_SSH_PORT"),
        "git_ssh": None,
        "default_secrets": [],
        "konduktor_debug": 0,
        "env_vars": set(task_envs),
    }
    pod_template = _render("pod.yaml.j2", pod_context)["kubernetes"]["pod_config"]

    # create_pod_spec after rendering: task envs override (a dict keeps each name's first
    # position), then the helper variables the bootstrap script prints, in its order.
    container = pod_template["spec"]["containers"][0]
    env_map = {e["name"]: e for e in container.get("env", [])}
    for key, value in task_envs.items():
        env_map[key] = {"name": key, "value": value}
    env = list(env_map.values())
    final_names = {e["name"] for e in env}
    task_names = sorted(n for n in task_envs if n in final_names)
    others = sorted(n for n in final_names if n not in task_names)
    for helper, names in (
        ("KONDUKTOR_ENV_SECRETS_HOPEFULLY_NO_NAME_COLLISION", []),
        ("KONDUKTOR_ENV_SECRETS_MAP_HOPEFULLY_NO_NAME_COLLISION", []),
        ("KONDUKTOR_ENV_TASK_ALL_HOPEFULLY_NO_NAME_COLLISION", task_names),
        ("KONDUKTOR_ENV_CONFIG_HOPEFULLY_NO_NAME_COLLISION", []),
        ("KONDUKTOR_ENV_OTHER_HOPEFULLY_NO_NAME_COLLISION", others),
    ):
        env.append({"name": helper, "value": ",".join(names)})
    container["env"] = env

    # jobset_utils.create_jobset's context for jobset.yaml.j2.
    backend = "backends/constants.py"
    jobset_context: dict[str, Any] = {
        "job_name": name,
        "user_id": user_hash,
        "num_nodes": nodes,
        "user": user,
        "accelerator_type": accelerator_type or "None",
        "num_accelerators": num_gpus,
        "completions": job_config.get("completions"),
        "max_restarts": job_config.get("max_restarts"),
        "max_execution_time": labels.get("maxRunDurationSeconds"),
        "jobset_name_label": _konduktor_constant(backend, "JOB_NAME_LABEL"),
        "jobset_userid_label": _konduktor_constant(backend, "USERID_LABEL"),
        "jobset_user_label": _konduktor_constant(backend, "USER_LABEL"),
        "jobset_accelerator_label": _konduktor_constant(backend, "ACCELERATOR_LABEL"),
        "jobset_num_accelerators_label": _konduktor_constant(backend, "NUM_ACCELERATORS_LABEL"),
        "jobset_max_execution_time_label": _konduktor_constant(
            backend, "MAX_EXECUTION_TIME_LABEL"
        ),
    }
    jobset: Manifest = _render("jobset.yaml.j2", jobset_context)["jobset"]
    # pod_utils.inject_jobset_metadata: the run-duration annotation (task label, else 7 days)
    # and the task's resources.labels, on the JobSet only.
    max_duration = labels.get("maxRunDurationSeconds")
    jobset["metadata"].setdefault("annotations", {})["kueue.x-k8s.io/maxRunDurationSeconds"] = (
        str(max_duration if max_duration is not None else 604800)
    )
    jobset["metadata"]["labels"].update(labels)
    # pod_utils.merge_pod_into_jobset_template
    jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"] = pod_template
    return jobset


def konduktor_pod(
    task_name: str | None = None,
    num_nodes: int | None = None,
    rank: int = 0,
    *,
    namespace: str = NAMESPACE,
    suffix: str = "3f9a",
    envs: Mapping[str, str] | None = None,
    resources: Mapping[str, Any] | None = None,
) -> Pod:
    """The pod of node ``rank`` of a Konduktor task (default: examples/konduktor-task.yaml,
    ``task_name`` and ``num_nodes`` override it): Konduktor's JobSet, then the JobSet and Job
    controllers and the API server. Its JobSet (and run id) is ``<task_name>-<suffix>``."""
    jobset = konduktor_jobset(
        task_name, num_nodes, suffix=suffix, envs=envs, resources=resources
    )
    return pod_of_jobset(jobset, rank, namespace=namespace)


# -- Kubeflow training-operator PyTorchJob (kubeflow.org/v1) ------------------------------------

PYTORCHJOB_PORT: Final = 23456  # kubeflowv1.PytorchJobDefaultPort, added by the defaults


def pytorchjob(name: str = "mnist-ddp", workers: int = 1) -> Manifest:
    """A PyTorchJob as a user writes it: one master and ``workers`` workers running train.py
    (the operator's env is enough for ``init_process_group``; no torchrun needed)."""
    def replica(replicas: int) -> dict[str, Any]:
        return {
            "replicas": replicas,
            "restartPolicy": "OnFailure",
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "pytorch",
                            "image": "pluto-train:0.1.0",
                            "command": ["python", "/workspace/train.py", "--steps=200"],
                            "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
                        }
                    ]
                }
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(workers)}},
    }


def _pytorchjob_defaults(job: Manifest) -> Manifest:
    # kubeflow.org/v1 SetDefaults_PyTorchJob: nprocPerNode "auto", one replica, OnFailure, and
    # the "pytorchjob-port" on the "pytorch" container.
    job = copy.deepcopy(job)
    job["spec"].setdefault("nprocPerNode", "auto")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        spec.setdefault("replicas", 1)
        spec.setdefault("restartPolicy", "OnFailure")
        for container in spec["template"]["spec"]["containers"]:
            if container["name"] == "pytorch":
                ports = container.setdefault("ports", [])
                if not any(p.get("name") == "pytorchjob-port" for p in ports):
                    ports.append({"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT})
    return job


def pod_of_pytorchjob(
    job: Manifest, replica_type: str = "master", index: int = 0, namespace: str = NAMESPACE
) -> Pod:
    """The admitted pod the training-operator creates for one replica (pkg/controller.v1:
    CreateNewPod, SetClusterSpec with setPodEnv and setInitContainer)."""
    job = _pytorchjob_defaults(job)
    name = job["metadata"]["name"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    rtype = {k.lower(): k for k in replicas}[replica_type]
    spec = replicas[rtype]
    if not 0 <= index < spec["replicas"]:
        raise ValueError(f"{rtype} index {index} outside 0..{spec['replicas'] - 1}")
    template = copy.deepcopy(spec["template"])
    pod_spec = template["spec"]
    total = sum(r["replicas"] for r in replicas.values())
    nproc = job["spec"]["nprocPerNode"]
    master_port = next(
        p["containerPort"]
        for c in replicas["Master"]["template"]["spec"]["containers"] if c["name"] == "pytorch"
        for p in c.get("ports", []) if p.get("name") == "pytorchjob-port"
    )
    rank = index + 1 if replica_type == "worker" else index
    # "auto" leaves the process count to torchrun; the operator then counts one per pod.
    world_size = total * (int(nproc) if nproc.isdigit() else 1)
    for container in pod_spec["containers"]:
        # setPodEnv, in its order.
        container.setdefault("env", []).extend(
            [
                {"name": "PYTHONUNBUFFERED", "value": "0"},
                {"name": "MASTER_PORT", "value": str(master_port)},
                {"name": "MASTER_ADDR", "value": f"{name}-master-0"},
                {"name": "WORLD_SIZE", "value": str(world_size)},
                {"name": "RANK", "value": str(rank)},
                {"name": "PET_NPROC_PER_NODE", "value": nproc},
                {"name": "PET_NODE_RANK", "value": str(rank)},
                {"name": "PET_NNODES", "value": str(total)},
            ]
        )
    if replica_type == "worker":
        # setInitContainer: workers wait until the master's Service resolves.
        pod_spec.setdefault("initContainers", []).append(
            {
                "name": "init-pytorch",
                "image": "alpine:3.10",
                "imagePullPolicy": "IfNotPresent",
                "resources": {
                    "limits": {"cpu": "100m", "memory": "20Mi"},
                    "requests": {"cpu": "50m", "memory": "10Mi"},
                },
                "command": [
                    "sh",
                    "-c",
                    f"err=1;for i in $(seq 100); do if nslookup {name}-master-0; then err=0 && "
                    "break; fi;echo waiting for master; sleep 2; done; exit $err",
                ],
            }
        )
    pod_spec["restartPolicy"] = "Never" if spec["restartPolicy"] == "ExitCode" else spec[
        "restartPolicy"]
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    labels.update(
        {
            KUBEFLOW_OPERATOR_NAME: "pytorchjob-controller",
            KUBEFLOW_JOB_NAME: name,
            KUBEFLOW_REPLICA_TYPE: replica_type,
            KUBEFLOW_REPLICA_INDEX: str(index),
        }
    )
    if replica_type == "master":
        labels[KUBEFLOW_JOB_ROLE] = "master"
    pod: Pod = {
        "metadata": {
            "name": f"{name}-{replica_type}-{index}",  # named, not generated
            "labels": labels,
            "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
            "ownerReferences": [
                _controller_ref("kubeflow.org/v1", "PyTorchJob", name,
                                _uid("PyTorchJob", namespace, name))
            ],
        },
        "spec": pod_spec,
    }
    if not pod["metadata"]["annotations"]:
        del pod["metadata"]["annotations"]
    return admitted(pod, namespace)


def pytorchjob_pod(
    replica_type: str = "master",
    index: int = 0,
    *,
    name: str = "mnist-ddp",
    workers: int = 1,
    namespace: str = NAMESPACE,
) -> Pod:
    """A master or worker pod of :func:`pytorchjob`."""
    return pod_of_pytorchjob(pytorchjob(name, workers), replica_type, index, namespace)


# -- pods nobody opted in ---------------------------------------------------------------------


def plain_pod(name: str = "debug", namespace: str = NAMESPACE) -> Pod:
    """``kubectl run debug --image=busybox:1.36 -- sleep 3600``: no Pluto label, no JobSet."""
    pod: Pod = {
        "metadata": {"name": name, "labels": {"run": name}},
        "spec": {
            "containers": [
                {"name": name, "image": "busybox:1.36", "args": ["sleep", "3600"]}
            ],
        },
    }
    return admitted(pod, namespace)


def env_of(pod: Mapping[str, Any], container: str | None = None) -> dict[str, Any]:
    """A container's env by name: the plain value, or the ``valueFrom`` mapping."""
    containers: Sequence[Mapping[str, Any]] = pod["spec"]["containers"]
    chosen = containers[0] if container is None else next(
        c for c in containers if c["name"] == container
    )
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in chosen.get("env", [])}
