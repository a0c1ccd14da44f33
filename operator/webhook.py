"""The pod webhook's decision: cache lookup, opt-in route, JSON patch. No I/O.

``PodInjector`` is the callable ``admission.review`` runs for each pod CREATE; it reads only the
in-memory cluster view, so its cost is what the latency benchmark measures on top of HTTPS.
"""

from __future__ import annotations

from pluto_operator.admission import Mutation, PodRequest
from pluto_operator.cache import ClusterView
from pluto_operator.injection import (
    Placement,
    app_users,
    envfrom_containers,
    injection_patch,
    is_injected,
    pod_env_value,
)
from pluto_operator.settings import OperatorSettings
from pluto_operator.targets import decide


class PodInjector:
    def __init__(self, settings: OperatorSettings, view: ClusterView, placement: Placement) -> None:
        self.settings = settings
        self.view = view
        self.placement = placement

    def __call__(self, request: PodRequest) -> Mutation:
        pod = request.pod
        if is_injected(pod):
            return Mutation()
        namespace = request.namespace
        decision = decide(
            pod, namespace, self.view.namespace(namespace), self.view.runs(namespace),
            self.settings,
        )
        binding = decision.binding
        if binding is None:
            return Mutation(warnings=decision.warnings)
        warnings = decision.warnings
        own = pod_env_value(pod, "PLUTO_RUN_ID")
        if own is not None and own != binding.run_id:
            # Never overridden (Konduktor sets it to the job name on purpose), but the pod then
            # logs into another run than the PlutoRun's: worth a word to whoever created it.
            warnings.append(
                f"pluto: the pod sets PLUTO_RUN_ID={own!r}, which it keeps; PlutoRun "
                f"{binding.plutorun!r} expects {binding.run_id!r}"
            )
        for name in envfrom_containers(pod):
            # env beats envFrom: a PLUTO_RUN_ID in the ConfigMap/Secret would be overridden,
            # and the webhook cannot look inside it to tell.
            warning = (
                f"pluto: container {name!r} takes variables from envFrom; the webhook sets "
                f"PLUTO_RUN_ID={binding.run_id!r} in its env, which overrides a PLUTO_RUN_ID "
                f"from envFrom: to keep your own, set PLUTO_RUN_ID in the container's env"
            )
            # Answered as an admission warning; the operator logs it and posts it as an event
            # on the pod's owner (main.Operator._report), like every warning here.
            warnings.append(warning)
        users = app_users(pod)
        if len({uid for _, uid in users}) > 1:
            first, uid = users[0]
            listed = ", ".join(f"{n}: {u if u is not None else 'image default'}"
                               for n, u in users)
            warnings.append(
                f"pluto: the pod's containers run as different users ({listed}); the sidecar "
                f"runs as {first!r}'s ({uid if uid is not None else 'its image default'}), so "
                f"the others may not be able to connect to its socket: set a pod "
                f"securityContext.fsGroup, or the same runAsUser for all"
            )
        patch = injection_patch(
            pod, binding, image=self.settings.sidecar_image, placement=self.placement,
            default_resources=self.settings.sidecar_resources,
        )
        return Mutation(patch, warnings)
