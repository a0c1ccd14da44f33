"""The sidecar's resources, fitted so that joining a pod does not change how it is treated.

A pod's QoS class is computed from all its containers, init containers included: it is
*Guaranteed* only when every one of them has CPU and memory limits equal to its requests. A
sidecar with the plain defaults (requests, and a memory limit only) would demote such a pod
to *Burstable*, and with it lose what training pods are made Guaranteed for: exclusive CPUs
under the kubelet's static CPU manager, NUMA alignment with the GPUs under the topology
manager, last place in line for eviction. So in a Guaranteed pod the sidecar's requests and
limits are made equal too.

Short of that, a pod whose every container sets a CPU (or memory) limit most likely lives in
a namespace whose ResourceQuota counts ``limits.cpu`` (``limits.memory``): the API server
refuses a pod with one container that sets none, so the sidecar gets that limit too.

Only the defaults are fitted (the operator's, or ``--sidecar-resources``): resources a
PlutoRun sets in ``spec.sidecar.resources`` are its author's choice and used as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pluto_operator.quantities import quantity_value

#: The CPU a sidecar is limited to when it must have a CPU limit and its defaults set none: a
#: limit throttles, and forwarding a million points a second costs it about a quarter of a CPU.
LIMITED_SIDECAR_CPU = "500m"
#: The least memory limit a sidecar gets when its limit is made from its request.
LIMITED_SIDECAR_MEMORY = "256Mi"

_QOS_RESOURCES = ("cpu", "memory")
_FLOORS = {"cpu": LIMITED_SIDECAR_CPU, "memory": LIMITED_SIDECAR_MEMORY}


def resources_keeping_qos(defaults: Mapping[str, Any],
                          pod_spec: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` (a container's ``resources``), fitted to the pod as the docstring says."""
    requests = dict(defaults.get("requests") or {})
    limits = dict(defaults.get("limits") or {})
    containers = _all_containers(pod_spec)
    if containers and all(_is_guaranteed(c) for c in containers):
        for name in _QOS_RESOURCES:
            value = limits.get(name) or _at_least(requests.get(name), _FLOORS[name])
            requests[name] = limits[name] = value
    elif containers:
        for name in _QOS_RESOURCES:
            if name not in limits and all(name in _limits(c) for c in containers):
                limits[name] = _at_least(requests.get(name), _FLOORS[name])
    fitted = {key: value for key, value in defaults.items() if key not in ("requests", "limits")}
    if requests:
        fitted["requests"] = requests
    if limits:
        fitted["limits"] = limits
    return fitted


def _all_containers(pod_spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(pod_spec.get("containers") or []), *(pod_spec.get("initContainers") or [])]


def _limits(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return (container.get("resources") or {}).get("limits") or {}


def _is_guaranteed(container: Mapping[str, Any]) -> bool:
    """CPU and memory limits, and requests equal to them (a request left out defaults to
    the limit)."""
    requests = (container.get("resources") or {}).get("requests") or {}
    limits = _limits(container)
    for name in _QOS_RESOURCES:
        if name not in limits:
            return False
        if name in requests and not _same(requests[name], limits[name]):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    try:
        return quantity_value(a) == quantity_value(b)
    except ValueError:
        return str(a) == str(b)


def _at_least(value: Any, floor: str) -> Any:
    """``value``, or ``floor`` when it is smaller or missing (or not a quantity)."""
    if value is None:
        return floor
    try:
        return value if quantity_value(value) >= quantity_value(floor) else floor
    except ValueError:
        return floor
