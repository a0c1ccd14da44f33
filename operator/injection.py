"""The pod mutation: a JSON patch that adds the run's env, the shared volume and the sidecar.

Pure: the webhook calls ``injection_patch`` with the pod from the AdmissionReview and gets the
operations to return, so every rule of docs/operator.md ("What the webhook adds") is checked by
applying the patch to real pod specs in the tests. The patch only ever *adds*: it never replaces
what the pod's author wrote (a variable, a mount), which is what makes reinvocation and
already-set variables safe. The one replacement is a grace period of exactly Kubernetes' default,
raised when the sidecar's drain needs longer (see ``_drain_and_grace``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pluto_operator.names import (
    ANNOTATION_INJECTED,
    ANNOTATION_PLUTORUN,
    API_KEY_FILE,
    API_KEY_MOUNT_PATH,
    API_KEY_VOLUME,
    COMPLETION_INDEX_ANNOTATION,
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_GRACE_SECONDS,
    GRACE_MARGIN_SECONDS,
    LABEL_RUN,
    MOUNT_PATH,
    SIDECAR_CONTAINER,
    SIDECAR_HEALTH_PORT,
    SIDECAR_HEALTH_PORT_NAME,
    SOCKET_PATH,
    SPOOL_PATH,
    VOLUME,
    label_value,
)
from pluto_operator.qos import resources_keeping_qos
from pluto_operator.quantities import quantity_value
from pluto_operator.targets import Binding

Patch = list[dict[str, Any]]
Placement = Literal["native", "classic"]

DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}

#: Classic sidecars exit this long after the last rank disconnected (torchrun restarts of
#: workers reconnect well within it).
CLASSIC_IDLE_EXIT_SECONDS = 30

def _escape(segment: str) -> str:
    """A JSON pointer segment (RFC 6901): ``pluto.dev/run`` -> ``pluto.dev~1run``."""
    return segment.replace("~", "~0").replace("/", "~1")


def is_injected(pod: Mapping[str, Any]) -> bool:
    """The marker annotation, or a container already named like the sidecar."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if ANNOTATION_INJECTED in annotations:
        return True
    spec = pod.get("spec") or {}
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    return any(c.get("name") == SIDECAR_CONTAINER for c in containers)


def _env_names(container: Mapping[str, Any]) -> set[str]:
    return {e.get("name", "") for e in container.get("env") or []}


def pod_env_value(pod: Mapping[str, Any], name: str) -> str | None:
    """The literal value the pod's first container that sets ``name`` gives it, if any."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for entry in container.get("env") or []:
            if entry.get("name") == name and "value" in entry:
                return str(entry["value"])
    return None


def _effective(pod_context: Mapping[str, Any], container: Mapping[str, Any],
               key: str) -> int | None:
    """A container's ``securityContext`` ``key``, else the pod's (Kubernetes' own rule)."""
    own = (container.get("securityContext") or {}).get(key)
    value = own if own is not None else pod_context.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def app_users(pod: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """Each app container's name and effective ``runAsUser`` (None: the image's user)."""
    spec = pod.get("spec") or {}
    pod_context = spec.get("securityContext") or {}
    return [(str(c.get("name", "")), _effective(pod_context, c, "runAsUser"))
            for c in spec.get("containers") or []]


def sidecar_security_context(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar's ``securityContext``: Pod Security "restricted", as the app's user.

    The sidecar creates its socket 0660: a training container running as another uid, with no
    pod ``fsGroup`` to share a group through, could not connect. So the sidecar runs as the
    first app container's effective ``runAsUser`` (and ``runAsGroup`` when set), making the
    socket that user's. Only a non-root uid is copied: a root app keeps the sidecar on its
    image's user (10001), and ``runAsNonRoot`` is left out only when the pod itself sets
    ``runAsUser: 0``, which the sidecar would then inherit.
    """
    pod_context = spec.get("securityContext") or {}
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    containers = spec.get("containers") or []
    first = containers[0] if containers else {}
    uid = _effective(pod_context, first, "runAsUser")
    if uid is not None and uid != 0:
        context["runAsUser"] = uid
        gid = _effective(pod_context, first, "runAsGroup")
        if gid is not None:
            context["runAsGroup"] = gid
        context["runAsNonRoot"] = True
    elif pod_context.get("runAsUser") != 0:
        # The image's numeric USER (10001), or the pod's non-root runAsUser.
        context["runAsNonRoot"] = True
    return context


def envfrom_containers(pod: Mapping[str, Any]) -> list[str]:
    """Containers that take variables from ``envFrom`` and do not set ``PLUTO_RUN_ID`` in ``env``.

    The webhook cannot see into the ConfigMaps and Secrets they name; if one holds
    ``PLUTO_RUN_ID``, the variable the webhook adds to ``env`` takes precedence over it.
    A source with a prefix that cannot produce ``PLUTO_RUN_ID`` is not counted.
    """
    spec = pod.get("spec") or {}
    found = []
    for container in spec.get("containers") or []:
        if "PLUTO_RUN_ID" in _env_names(container):
            continue
        sources = container.get("envFrom") or []
        if any("PLUTO_RUN_ID".startswith(str(src.get("prefix") or "")) for src in sources):
            found.append(str(container.get("name", "")))
    return found


def _add_map_entry(patch: Patch, obj: Mapping[str, Any], path: str, key: str, value: str) -> None:
    existing = obj.get(path.rsplit("/", 1)[-1])
    if existing is None:
        patch.append({"op": "add", "path": path, "value": {key: value}})
    elif key not in existing:
        patch.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})


def _append(patch: Patch, present: bool, path: str, items: list[Any]) -> None:
    if not items:
        return
    if not present:
        patch.append({"op": "add", "path": path, "value": items})
    else:
        patch.extend({"op": "add", "path": f"{path}/-", "value": item} for item in items)


def sidecar_container(
    binding: Binding, image: str, placement: Placement, drain_seconds: int,
    default_resources: Mapping[str, Any] | None = None,
    security_context: Mapping[str, Any] | None = None,
    pod_spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``pluto sidecar`` container for ``pod_spec``, a pod covered by ``binding``."""
    sidecar = binding.sidecar
    host_network = bool((pod_spec or {}).get("hostNetwork"))
    if host_network:
        # The pod shares the node's network: a declared port is a host port, so two such pods
        # could not be on one node (the second stays Pending), and 0.0.0.0 would be the node's
        # every address. The health server takes any free port on the node's loopback instead,
        # and the probes look for the socket (the sidecar makes it once it listens).
        args = ["sidecar", "--health-host", "127.0.0.1", "--health-port", "0"]
        probe: dict[str, Any] = {"exec": {"command": ["test", "-S", SOCKET_PATH]}}
    else:
        args = ["sidecar", "--health-host", "0.0.0.0", "--health-port", str(SIDECAR_HEALTH_PORT)]
        probe = {"httpGet": {"path": "/readyz", "port": SIDECAR_HEALTH_PORT_NAME}}
    # The key's Secret is optional (a server without auth needs none): a missing file then
    # means no key, and the key is used from when the Secret appears.
    args += ["--drain-seconds", str(drain_seconds), "--api-key-file", API_KEY_FILE,
             "--api-key-optional"]
    if sidecar is not None and sidecar.spool_size is not None:
        mib = max(1, math.ceil(quantity_value(sidecar.spool_size) / 2**20))
        args += ["--spool-max-mb", str(mib)]
    resources: Mapping[str, Any]
    if sidecar is not None and sidecar.resources is not None:
        resources = sidecar.resources.to_dict()  # as written: see pluto_operator.qos
    else:
        resources = resources_keeping_qos(default_resources or DEFAULT_RESOURCES,
                                          pod_spec or {})
    container: dict[str, Any] = {
        "name": SIDECAR_CONTAINER,
        "image": (sidecar.image if sidecar is not None and sidecar.image else image),
        "command": ["pluto"],
        "args": args,
        "env": [
            {"name": "PLUTO_URL", "value": binding.server_url},
            {"name": "PLUTO_SIDECAR_SOCKET", "value": SOCKET_PATH},
            {"name": "PLUTO_SPOOL_DIR", "value": SPOOL_PATH},
            # Empty for pods outside an Indexed Job, which the sidecar reads as node 0.
            {"name": "PLUTO_NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']",
            }}},
            # NVML in the sidecar sees the node's GPUs without requesting one.
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
        ],
        # Ready once the socket listens (and, probed over HTTP, the spool is writable). No
        # liveness probe: a restart mid-flush would stall every rank of the pod for nothing.
        "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "resources": dict(resources),
        "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT_PATH},
                         {"name": API_KEY_VOLUME, "mountPath": API_KEY_MOUNT_PATH,
                          "readOnly": True}],
        "securityContext": dict(security_context or sidecar_security_context({})),
    }
    if not host_network:
        container["ports"] = [{"name": SIDECAR_HEALTH_PORT_NAME,
                               "containerPort": SIDECAR_HEALTH_PORT, "protocol": "TCP"}]
    if placement == "classic":
        # Nothing stops a classic sidecar when the training ends; without this the Job's pod
        # would never complete.
        args += ["--exit-when-idle", str(CLASSIC_IDLE_EXIT_SECONDS)]
    if placement == "native":
        # The kubelet starts the app containers only after this probe passes: the socket is
        # there before the first rank looks for it.
        container["startupProbe"] = {**probe, "periodSeconds": 1, "failureThreshold": 120}
        container["restartPolicy"] = "Always"
    return container


FORK_ENV = ("PLUTO_FORK_RUN_ID", "PLUTO_FORK_STEP", "PLUTO_FORK_INHERIT_CONFIG",
            "PLUTO_FORK_INHERIT_TAGS")


def app_env(binding: Binding) -> list[dict[str, str]]:
    env = [
        {"name": "PLUTO_RUN_ID", "value": binding.run_id},
        {"name": "PLUTO_PROJECT", "value": binding.project},
        {"name": "PLUTO_SIDECAR_SOCKET", "value": SOCKET_PATH},
    ]
    if binding.fork_run_id is not None and binding.fork_step is not None:
        # Whichever process opens the run first (a rank may beat the reconciler) opens it as
        # the fork; the SDK reads these when its run id comes from PLUTO_RUN_ID.
        env += [{"name": "PLUTO_FORK_RUN_ID", "value": binding.fork_run_id},
                {"name": "PLUTO_FORK_STEP", "value": str(binding.fork_step)},
                {"name": "PLUTO_FORK_INHERIT_CONFIG",
                 "value": "true" if binding.fork_inherit_config else "false"},
                {"name": "PLUTO_FORK_INHERIT_TAGS",
                 "value": "true" if binding.fork_inherit_tags else "false"}]
    return env


def _container_env(container: Mapping[str, Any], binding: Binding) -> list[dict[str, str]]:
    """The run's variables a container lacks. The fork variables go only where the run id is
    the binding's: a container that sets its own PLUTO_RUN_ID must not fork that other run."""
    own = {e.get("name"): e for e in container.get("env") or []}
    run_id = own.get("PLUTO_RUN_ID")
    keeps_other_run = run_id is not None and run_id.get("value") != binding.run_id
    return [e for e in app_env(binding)
            if e["name"] not in own and not (keeps_other_run and e["name"] in FORK_ENV)]


def _wire_container(patch: Patch, base: str, container: Mapping[str, Any],
                    binding: Binding) -> None:
    """Env and the socket's mount for one container at JSON pointer ``base``."""
    _append(patch, container.get("env") is not None, f"{base}/env",
            _container_env(container, binding))
    mounts = container.get("volumeMounts")
    if not any(m.get("mountPath", "").rstrip("/") == MOUNT_PATH for m in mounts or []):
        _append(patch, mounts is not None, f"{base}/volumeMounts",
                [{"name": VOLUME, "mountPath": MOUNT_PATH}])


def injection_patch(
    pod: Mapping[str, Any], binding: Binding, *, image: str, placement: Placement,
    default_resources: Mapping[str, Any] | None = None,
) -> Patch:
    """JSON patch operations that inject ``binding`` into ``pod``; empty if already injected."""
    if is_injected(pod):
        return []
    patch: Patch = []
    metadata = pod.get("metadata") or {}
    if "metadata" not in pod:
        patch.append({"op": "add", "path": "/metadata", "value": {}})
    # A PlutoRun name may be longer than a label value: the label carries label_value(name),
    # which the reconciler lists pods by, and the annotation the full name.
    label = label_value(binding.plutorun)
    labels = metadata.get("labels") or {}
    if label != binding.plutorun and LABEL_RUN not in labels:
        _add_map_entry(patch, metadata, "/metadata/annotations", ANNOTATION_PLUTORUN,
                       binding.plutorun)
        metadata = {**metadata, "annotations": {**(metadata.get("annotations") or {}),
                                                ANNOTATION_PLUTORUN: binding.plutorun}}
    _add_map_entry(patch, metadata, "/metadata/annotations", ANNOTATION_INJECTED, binding.run_id)
    _add_map_entry(patch, metadata, "/metadata/labels", LABEL_RUN, label)

    spec = pod.get("spec") or {}
    volumes = spec.get("volumes")
    have = {v.get("name") for v in volumes or []}
    _append(patch, volumes is not None, "/spec/volumes",
            [v for v in (_run_volume(), _api_key_volume(binding)) if v["name"] not in have])

    for index, container in enumerate(spec.get("containers") or []):
        _wire_container(patch, f"/spec/containers/{index}", container, binding)
    if placement == "native":
        # The native sidecar starts before them (it goes first, below), so the init containers
        # can log through it too; their indices are the ones before it is inserted.
        for index, container in enumerate(spec.get("initContainers") or []):
            _wire_container(patch, f"/spec/initContainers/{index}", container, binding)

    drain, grace_op = _drain_and_grace(spec, binding)
    if grace_op is not None:
        patch.append(grace_op)
    sidecar = sidecar_container(binding, image, placement, drain, default_resources,
                                sidecar_security_context(spec), spec)
    if placement == "native":
        # First, so that other init containers can log through it too.
        if spec.get("initContainers"):
            patch.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
        else:
            patch.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    else:
        patch.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
    return patch


def _run_volume() -> dict[str, Any]:
    """The socket and the spool, shared by the sidecar and the ranks."""
    return {"name": VOLUME, "emptyDir": {}}


def _api_key_volume(binding: Binding) -> dict[str, Any]:
    """The API key, for the sidecar only. Optional: a server without auth needs no Secret,
    and a missing one must not keep the pod from starting."""
    secret = binding.api_key_secret
    return {"name": API_KEY_VOLUME, "secret": {
        "secretName": secret.name, "optional": True,
        "items": [{"key": secret.key, "path": API_KEY_FILE.rsplit("/", 1)[1]}],
    }}


def _drain_and_grace(
    spec: Mapping[str, Any], binding: Binding
) -> tuple[int, dict[str, Any] | None]:
    """The sidecar's SIGTERM drain, and the grace-period operation that makes room for it.

    The API server fills in Kubernetes' default of 30 s before webhooks run, so 30 is read as
    "not chosen": a longer drain the PlutoRun asks for raises it. Any other grace period was
    chosen by the pod's author and is kept: the drain shrinks to fit inside it.
    """
    wanted = DEFAULT_DRAIN_SECONDS
    if binding.sidecar is not None and binding.sidecar.drain_seconds is not None:
        wanted = binding.sidecar.drain_seconds
    grace = spec.get("terminationGracePeriodSeconds")
    if grace is not None and int(grace) != DEFAULT_GRACE_SECONDS:
        return max(1, min(wanted, int(grace) - GRACE_MARGIN_SECONDS)), None
    needed = wanted + GRACE_MARGIN_SECONDS
    if needed <= DEFAULT_GRACE_SECONDS:
        return wanted, None
    op = "add" if grace is None else "replace"
    return wanted, {"op": op, "path": "/spec/terminationGracePeriodSeconds", "value": needed}
