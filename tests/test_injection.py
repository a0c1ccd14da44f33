"""The webhook's decision and patch, on pod specs: who is covered, and what a pod gets.

Every test applies the returned JSON patch the way the API server does (RFC 6902) and looks at
the resulting pod, so a patch that is well-meant but malformed (a wrong path, an ``add`` onto a
missing list) fails here rather than in a cluster.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonpatch
import pytest

from pluto_operator.admission import PodRequest, review
from pluto_operator.cache import known_run
from pluto_operator.injection import injection_patch, is_injected
from pluto_operator.model import PlutoRun
from pluto_operator.names import label_value
from pluto_operator.quantities import quantity_value
from pluto_operator.settings import OperatorSettings, SecretRef
from pluto_operator.targets import Binding, KnownRun, NamespaceInfo, decide
from pluto_operator.webhook import PodInjector

SETTINGS = OperatorSettings(server_url="http://pluto.example:7300",
                            sidecar_image="example/pluto:test")


def pod(labels: dict[str, str] | None = None, env: list[dict[str, Any]] | None = None,
        **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "trainer", "image": "pytorch:2",
                                 "command": ["torchrun", "train.py"]}
    if env is not None:
        container["env"] = env
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "train-", "labels": labels or {}},
        "spec": {"containers": [container], "restartPolicy": "Never", **spec},
    }


def plutorun(name: str, created: str = "2026-01-01T00:00:00Z", namespace: str = "ml",
             **spec: Any) -> KnownRun:
    body = {"metadata": {"name": name, "namespace": namespace},
            "spec": {"project": "llm", **spec}}
    return KnownRun(name, namespace, created, PlutoRun.model_validate(body))


def binding(**overrides: Any) -> Binding:
    values: dict[str, Any] = dict(
        route="label", plutorun="sft", run_id="sft", project="llm",
        server_url="http://pluto.example:7300", api_key_secret=SecretRef("pluto-api-key", "k"),
    )
    values.update(overrides)
    return Binding(**values)


def apply(p: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(p, ops)
    return result


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# -- which run covers a pod ----------------------------------------------------------------


class TestDecide:
    def test_label_names_the_plutorun(self) -> None:
        d = decide(pod({"pluto.dev/run": "sft"}), "ml", None, [plutorun("sft")], SETTINGS)
        assert d.binding is not None
        assert (d.binding.route, d.binding.run_id, d.binding.project) == ("label", "sft", "llm")

    def test_label_wins_over_a_matching_selector(self) -> None:
        runs = [plutorun("other", selector={"matchLabels": {"app": "x"}}),
                plutorun("sft", created="2026-02-01T00:00:00Z")]
        d = decide(pod({"pluto.dev/run": "sft", "app": "x"}), "ml", None, runs, SETTINGS)
        assert d.binding is not None and d.binding.plutorun == "sft"

    def test_label_naming_a_missing_plutorun_warns_and_injects_nothing(self) -> None:
        d = decide(pod({"pluto.dev/run": "nope"}), "ml", None, [plutorun("sft")], SETTINGS)
        assert d.binding is None
        assert "no PlutoRun 'nope'" in d.warnings[0]

    def test_plutorun_of_another_namespace_does_not_count(self) -> None:
        runs = [plutorun("sft", namespace="other")]
        d = decide(pod({"pluto.dev/run": "sft"}), "ml", None, runs, SETTINGS)
        assert d.binding is None

    def test_selector_match_and_oldest_wins_with_a_warning(self) -> None:
        runs = [plutorun("young", created="2026-03-01T00:00:00Z",
                         selector={"matchLabels": {"job": "a"}}),
                plutorun("old", created="2026-01-01T00:00:00Z",
                         selector={"matchExpressions": [
                             {"key": "job", "operator": "In", "values": ["a", "b"]}]})]
        d = decide(pod({"job": "a"}), "ml", None, runs, SETTINGS)
        assert d.binding is not None and d.binding.plutorun == "old"
        assert d.binding.route == "selector"
        assert "young" in d.warnings[0]

    @pytest.mark.parametrize(("expressions", "labels", "covered"), [
        ([{"key": "tier", "operator": "NotIn", "values": ["web"]}], {}, True),
        ([{"key": "tier", "operator": "NotIn", "values": ["web"]}], {"tier": "web"}, False),
        ([{"key": "gpu", "operator": "Exists"}], {"gpu": ""}, True),
        ([{"key": "gpu", "operator": "Exists"}], {}, False),
        ([{"key": "gpu", "operator": "DoesNotExist"}], {"gpu": "1"}, False),
        ([{"key": "job", "operator": "In", "values": ["a"]}], {"job": "b"}, False),
    ])
    def test_selector_operators(self, expressions: list[dict[str, Any]],
                                labels: dict[str, str], covered: bool) -> None:
        runs = [plutorun("sft", selector={"matchExpressions": expressions})]
        assert (decide(pod(labels), "ml", None, runs, SETTINGS).binding is not None) is covered

    def test_plutorun_without_selector_covers_only_labelled_pods(self) -> None:
        assert decide(pod({"a": "b"}), "ml", None, [plutorun("sft")], SETTINGS).binding is None

    def test_namespace_route_covers_jobset_pods_only_when_enabled(self) -> None:
        jobset_pod = pod({"jobset.sigs.k8s.io/jobset-name": "llama"})
        enabled = NamespaceInfo({"pluto.dev/inject": "enabled"}, {"pluto.dev/project": "p1"})
        d = decide(jobset_pod, "ml", enabled, [], SETTINGS)
        assert d.binding is not None
        assert (d.binding.route, d.binding.run_id, d.binding.project) == (
            "namespace", "llama", "p1")
        assert decide(jobset_pod, "ml", NamespaceInfo(), [], SETTINGS).binding is None
        assert decide(pod(), "ml", enabled, [], SETTINGS).binding is None

    def test_namespace_project_falls_back_to_default_then_namespace(self) -> None:
        jobset_pod = pod({"jobset.sigs.k8s.io/jobset-name": "llama"})
        enabled = NamespaceInfo({"pluto.dev/inject": "enabled"})
        d = decide(jobset_pod, "team-a", enabled, [], SETTINGS)
        assert d.binding is not None and d.binding.project == "team-a"
        custom = OperatorSettings(default_project="shared")
        d = decide(jobset_pod, "team-a", enabled, [], custom)
        assert d.binding is not None and d.binding.project == "shared"

    def test_opt_out_label_beats_everything(self) -> None:
        runs = [plutorun("sft", selector={})]
        d = decide(pod({"pluto.dev/run": "sft", "pluto.dev/inject": "disabled"}), "ml", None,
                   runs, SETTINGS)
        assert d.binding is None and d.warnings == []

    def test_plutorun_server_and_secret_override_the_operator_defaults(self) -> None:
        run = plutorun("sft", server={"url": "http://other:7300", "apiKeySecretRef": {
            "name": "team-key", "key": "token"}})
        d = decide(pod({"pluto.dev/run": "sft"}), "ml", None, [run], SETTINGS)
        assert d.binding is not None
        assert d.binding.server_url == "http://other:7300"
        assert d.binding.api_key_secret == SecretRef("team-key", "token")


# -- what a covered pod gets ---------------------------------------------------------------


class TestPatch:
    def test_native_sidecar_env_volume_and_marker(self) -> None:
        original = pod({"app": "x"})
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        sidecar = result["spec"]["initContainers"][0]
        assert sidecar["name"] == "pluto-sidecar"
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert "livenessProbe" not in sidecar
        assert sidecar["command"] == ["pluto"] and sidecar["args"][0] == "sidecar"
        env = env_of(sidecar)
        assert env["PLUTO_URL"] == "http://pluto.example:7300"
        # The key is a file from the Secret, mounted in the sidecar only: the kubelet
        # rewrites it when the Secret changes, and the sidecar follows it.
        assert "PLUTO_API_KEY" not in env
        assert sidecar["args"][-3:] == ["--api-key-file", "/var/run/pluto-api-key/api-key",
                                        "--api-key-optional"]
        assert {"name": "pluto-api-key", "mountPath": "/var/run/pluto-api-key",
                "readOnly": True} in sidecar["volumeMounts"]
        assert {"name": "pluto-api-key", "secret": {
            "secretName": "pluto-api-key", "optional": True,
            "items": [{"key": "k", "path": "api-key"}]}} in result["spec"]["volumes"]
        assert env["PLUTO_NODE_RANK"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")
        assert env["PLUTO_SPOOL_DIR"] == "/var/run/pluto/spool"
        app = result["spec"]["containers"][0]
        assert env_of(app) == {"PLUTO_RUN_ID": "sft", "PLUTO_PROJECT": "llm",
                               "PLUTO_SIDECAR_SOCKET": "/var/run/pluto/pluto.sock"}
        assert "PLUTO_API_KEY" not in env_of(app)  # credentials stay with the sidecar
        assert app["volumeMounts"] == [{"name": "pluto-run", "mountPath": "/var/run/pluto"}]
        assert {"name": "pluto-run", "emptyDir": {}} in result["spec"]["volumes"]
        assert result["metadata"]["annotations"]["pluto.dev/injected"] == "sft"
        assert result["metadata"]["labels"] == {"app": "x", "pluto.dev/run": "sft"}
        assert "terminationGracePeriodSeconds" not in result["spec"]  # 25 s drain fits 30 s

    def test_native_sidecar_goes_before_existing_init_containers(self) -> None:
        original = pod(initContainers=[{"name": "fetch", "image": "busybox",
                                        "command": ["true"]}])
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        assert [c["name"] for c in result["spec"]["initContainers"]] == [
            "pluto-sidecar", "fetch"]

    def test_classic_sidecar_is_a_container_without_restart_policy(self) -> None:
        original = pod()
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="classic"))
        names = [c["name"] for c in result["spec"]["containers"]]
        assert names == ["trainer", "pluto-sidecar"]
        assert "initContainers" not in result["spec"]
        sidecar = result["spec"]["containers"][1]
        assert "restartPolicy" not in sidecar and "startupProbe" not in sidecar

    def test_values_the_pod_sets_are_never_overridden(self) -> None:
        original = pod(env=[{"name": "PLUTO_RUN_ID", "value": "konduktor-job"},
                            {"name": "PLUTO_PROJECT", "value": "mine"}])
        original["spec"]["containers"][0]["volumeMounts"] = [
            {"name": "own", "mountPath": "/var/run/pluto/"}]
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        app = result["spec"]["containers"][0]
        assert env_of(app)["PLUTO_RUN_ID"] == "konduktor-job"
        assert env_of(app)["PLUTO_PROJECT"] == "mine"
        assert env_of(app)["PLUTO_SIDECAR_SOCKET"] == "/var/run/pluto/pluto.sock"
        assert app["volumeMounts"] == [{"name": "own", "mountPath": "/var/run/pluto/"}]

    def test_every_app_container_gets_env_and_mount(self) -> None:
        original = pod()
        original["spec"]["containers"].append({"name": "eval", "image": "x", "command": ["y"],
                                               "env": [], "volumeMounts": []})
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        for container in result["spec"]["containers"]:
            assert env_of(container)["PLUTO_RUN_ID"] == "sft"
            assert container["volumeMounts"][-1]["mountPath"] == "/var/run/pluto"

    def test_reinvocation_adds_nothing(self) -> None:
        original = pod()
        once = apply(original, injection_patch(original, binding(), image="img",
                                               placement="native"))
        assert is_injected(once)
        assert injection_patch(once, binding(), image="img", placement="native") == []
        # The sidecar container alone (marker annotation stripped by someone) also counts.
        del once["metadata"]["annotations"]
        assert injection_patch(once, binding(), image="img", placement="native") == []

    def test_sidecar_settings_from_the_plutorun(self) -> None:
        spec = PlutoRun.model_validate({"metadata": {"name": "x"}, "spec": {
            "project": "p", "sidecar": {"image": "own/pluto:1", "spoolSize": "2Gi",
                                        "drainSeconds": 60,
                                        "resources": {"limits": {"memory": "1Gi"}}}}}).spec
        original = pod()
        result = apply(original, injection_patch(original, binding(sidecar=spec.sidecar),
                                                 image="img", placement="native"))
        sidecar = result["spec"]["initContainers"][0]
        assert sidecar["image"] == "own/pluto:1"
        args = sidecar["args"]
        assert args[args.index("--spool-max-mb") + 1] == "2048"
        assert args[args.index("--drain-seconds") + 1] == "60"
        assert sidecar["resources"] == {"limits": {"memory": "1Gi"}}
        # A 60 s drain needs more than Kubernetes' default 30 s grace period.
        assert result["spec"]["terminationGracePeriodSeconds"] == 65

    def test_authors_grace_period_is_kept_and_the_drain_fits_inside(self) -> None:
        original = pod(terminationGracePeriodSeconds=12)
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        assert result["spec"]["terminationGracePeriodSeconds"] == 12
        args = result["spec"]["initContainers"][0]["args"]
        assert args[args.index("--drain-seconds") + 1] == "7"

    def test_label_keys_with_slashes_are_escaped_in_paths(self) -> None:
        original = pod({"app": "x"})
        original["metadata"]["annotations"] = {"other": "1"}
        ops = injection_patch(original, binding(), image="img", placement="native")
        paths = {op["path"] for op in ops}
        assert "/metadata/annotations/pluto.dev~1injected" in paths
        assert "/metadata/labels/pluto.dev~1run" in paths

    def test_pod_without_metadata_maps(self) -> None:
        original: dict[str, Any] = {"spec": {"containers": [{"name": "c", "image": "i"}]}}
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        assert result["metadata"]["labels"]["pluto.dev/run"] == "sft"

    @pytest.mark.parametrize(("text", "expected"), [
        ("2Gi", 2 * 2**30), ("500M", 500e6), ("1e9", 1e9), (1024, 1024.0), ("512Ki", 2**19),
    ])
    def test_quantities(self, text: str | int, expected: float) -> None:
        assert quantity_value(text) == expected


# -- the injector behind the webhook -------------------------------------------------------


class StaticView:
    def __init__(self, runs: list[KnownRun],
                 namespaces: dict[str, NamespaceInfo] | None = None) -> None:
        self._runs = runs
        self._namespaces = namespaces or {}

    def namespace(self, name: str) -> NamespaceInfo | None:
        return self._namespaces.get(name)

    def runs(self, namespace: str) -> list[KnownRun]:
        return [r for r in self._runs if r.namespace == namespace]


def test_injector_warns_when_the_pods_run_id_differs_from_the_plutoruns() -> None:
    injector = PodInjector(SETTINGS, StaticView([plutorun("sft", runId="sft-1")]), "native")
    konduktor_like = pod({"pluto.dev/run": "sft"},
                         env=[{"name": "PLUTO_RUN_ID", "value": "job-7"}])
    mutation = injector(PodRequest("u", "ml", konduktor_like, False))
    assert mutation.patch
    assert "PLUTO_RUN_ID='job-7'" in mutation.warnings[0]


def test_review_round_trip_keeps_the_original_untouched() -> None:
    injector = PodInjector(SETTINGS, StaticView([plutorun("sft")]), "native")
    original = pod({"pluto.dev/run": "sft"})
    before = copy.deepcopy(original)
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "abc", "kind": {"group": "", "version": "v1",
                                                          "kind": "Pod"},
                                   "operation": "CREATE", "namespace": "ml",
                                   "object": original}}).encode()
    reviewed = review(body, injector)
    assert reviewed.outcome == "patched"
    assert original == before


def test_operator_default_sidecar_resources_apply_unless_the_plutorun_sets_them() -> None:
    settings = OperatorSettings(sidecar_resources={"requests": {"cpu": "10m"}})
    injector = PodInjector(settings, StaticView([plutorun("sft")]), "native")
    mutation = injector(PodRequest("u", "ml", pod({"pluto.dev/run": "sft"}), False))
    sidecar = apply(pod({"pluto.dev/run": "sft"}), mutation.patch)["spec"]["initContainers"][0]
    assert sidecar["resources"] == {"requests": {"cpu": "10m"}}
    own = plutorun("own", sidecar={"resources": {"limits": {"memory": "1Gi"}}})
    injector = PodInjector(settings, StaticView([own]), "native")
    mutation = injector(PodRequest("u", "ml", pod({"pluto.dev/run": "own"}), False))
    sidecar = apply(pod({"pluto.dev/run": "own"}), mutation.patch)["spec"]["initContainers"][0]
    assert sidecar["resources"] == {"limits": {"memory": "1Gi"}}


# -- the pod's QoS class and ResourceQuota ----------------------------------------------------


def qos_class(spec: dict[str, Any]) -> str:
    """The QoS class Kubernetes gives a pod (GetPodQOS, without pod-level resources): from
    every container, init containers included, and only CPU and memory."""
    containers = [*spec.get("containers", []), *spec.get("initContainers", [])]
    guaranteed, any_set = True, False
    for container in containers:
        resources = container.get("resources") or {}
        requests = {k: quantity_value(v) for k, v in (resources.get("requests") or {}).items()
                    if k in ("cpu", "memory")}
        limits = {k: quantity_value(v) for k, v in (resources.get("limits") or {}).items()
                  if k in ("cpu", "memory")}
        any_set = any_set or bool(requests or limits)
        requests = {**limits, **requests}  # a request left out defaults to the limit
        if set(limits) != {"cpu", "memory"} or requests != limits:
            guaranteed = False
    return "Guaranteed" if guaranteed and any_set else "Burstable" if any_set else "BestEffort"


def resources(requests: dict[str, str] | None = None,
              limits: dict[str, str] | None = None) -> dict[str, Any]:
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def injected(run: KnownRun, spec: dict[str, Any],
             settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    """The pod's spec after the webhook's patch (native sidecar: the first init container)."""
    spec = dict(spec)
    trainer = spec.pop("trainer_resources", None)
    original = pod({"pluto.dev/run": run.name}, **spec)
    if trainer is not None:
        original["spec"]["containers"][0]["resources"] = trainer
    mutation = PodInjector(settings, StaticView([run]), "native")(
        PodRequest("u", "ml", original, False))
    assert mutation.patch
    patched: dict[str, Any] = apply(original, mutation.patch)["spec"]
    return patched


GPU_TRAINER = resources({"cpu": "8", "memory": "64Gi"}, {"cpu": "8", "memory": "64Gi",
                                                         "nvidia.com/gpu": "8"})


def test_a_guaranteed_pod_stays_guaranteed_with_the_sidecar() -> None:
    """Training pods are made Guaranteed for exclusive CPUs and NUMA alignment with the GPUs:
    a sidecar whose requests are not its limits would take that away from the whole pod."""
    before = pod()["spec"]
    before["containers"][0]["resources"] = GPU_TRAINER
    assert qos_class(before) == "Guaranteed"
    spec = injected(plutorun("sft"), {"trainer_resources": GPU_TRAINER})
    sidecar = spec["initContainers"][0]
    assert sidecar["resources"] == resources({"cpu": "500m", "memory": "256Mi"},
                                             {"cpu": "500m", "memory": "256Mi"})
    assert qos_class(spec) == "Guaranteed"
    # Limits alone make a container Guaranteed too (its requests default to them), and so
    # "1" and "1000m" are the same CPU.
    limits_only = resources(limits={"cpu": "1", "memory": "1Gi"})
    init = {"name": "fetch", "image": "busybox",
            "resources": resources({"cpu": "1000m"}, {"cpu": "1", "memory": "1Gi"})}
    spec = injected(plutorun("sft"), {"trainer_resources": limits_only,
                                      "initContainers": [init]})
    assert qos_class(spec) == "Guaranteed"


def test_the_operators_default_limits_are_kept_in_a_guaranteed_pod() -> None:
    settings = OperatorSettings(server_url=SETTINGS.server_url,
                                sidecar_resources=resources({"cpu": "2", "memory": "100Mi"},
                                                            {"memory": "1Gi"}))
    spec = injected(plutorun("sft"), {"trainer_resources": GPU_TRAINER}, settings)
    assert spec["initContainers"][0]["resources"] == resources(
        {"cpu": "2", "memory": "1Gi"}, {"cpu": "2", "memory": "1Gi"})
    assert qos_class(spec) == "Guaranteed"


def test_a_burstable_pod_gets_the_plain_defaults() -> None:
    trainer = resources({"cpu": "4", "memory": "16Gi"}, {"memory": "16Gi"})
    spec = injected(plutorun("sft"), {"trainer_resources": trainer})
    assert spec["initContainers"][0]["resources"] == resources(
        {"cpu": "50m", "memory": "64Mi"}, {"memory": "256Mi"})
    assert qos_class(spec) == "Burstable"
    spec = injected(plutorun("sft"), {})  # BestEffort: the sidecar's requests make it Burstable
    assert qos_class(spec) == "Burstable"


def test_a_pod_whose_every_container_sets_a_cpu_limit_gets_one_on_the_sidecar_too() -> None:
    """A namespace whose ResourceQuota counts limits.cpu refuses a pod with one container that
    sets none: the sidecar must not be that container."""
    trainer = resources({"cpu": "2", "memory": "8Gi"}, {"cpu": "4", "memory": "8Gi"})
    spec = injected(plutorun("sft"), {"trainer_resources": trainer})
    assert qos_class(spec) == "Burstable"
    assert spec["initContainers"][0]["resources"] == resources(
        {"cpu": "50m", "memory": "64Mi"}, {"cpu": "500m", "memory": "256Mi"})


def test_the_plutoruns_own_sidecar_resources_are_used_as_written() -> None:
    own = resources({"cpu": "100m"}, {"memory": "1Gi"})
    spec = injected(plutorun("own", sidecar={"resources": own}),
                    {"trainer_resources": GPU_TRAINER})
    assert spec["initContainers"][0]["resources"] == own
    assert qos_class(spec) == "Burstable"  # its author's choice, documented


# -- long PlutoRun names (label values hold at most 63 characters) ---------------------------

LONG_NAME = "llama-3-70b-sft-cosine-warmup2000-bs512-seq8192-lr3e-4-sweep-run-03"  # 67 characters
# apimachinery's IsValidLabelValue.
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


class TestLongNames:
    @pytest.mark.parametrize("name", [
        "sft", "x" * 63, "x" * 64, LONG_NAME, "a." * 120 + "b", "a" * 52 + "-" + "b" * 200,
    ])
    def test_label_value_is_always_a_valid_label_value(self, name: str) -> None:
        value = label_value(name)
        assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
        assert value == label_value(name)  # the webhook and the reconciler agree
        if len(name) <= 63:
            assert value == name  # a name that fits is kept as is

    def test_long_names_sharing_a_prefix_get_different_values(self) -> None:
        assert label_value(LONG_NAME) != label_value(LONG_NAME[:-1] + "4")
        assert label_value(LONG_NAME).startswith(LONG_NAME[:40])

    def test_selector_covered_pod_gets_a_valid_label_and_the_full_name(self) -> None:
        run = plutorun(LONG_NAME, selector={"matchLabels": {"job": "sweep-03"}})
        injector = PodInjector(SETTINGS, StaticView([run]), "native")
        original = pod({"job": "sweep-03"})
        result = apply(original, injector(PodRequest("u", "ml", original, False)).patch)
        label = result["metadata"]["labels"]["pluto.dev/run"]
        assert label == label_value(LONG_NAME) and len(label) <= 63
        assert result["metadata"]["annotations"]["pluto.dev/plutorun"] == LONG_NAME

    def test_short_name_gets_no_extra_annotation(self) -> None:
        original = pod({"app": "x"})
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        assert "pluto.dev/plutorun" not in result["metadata"]["annotations"]

    def test_pod_labelled_with_the_shortened_name_is_covered(self) -> None:
        labelled = pod({"pluto.dev/run": label_value(LONG_NAME)})
        d = decide(labelled, "ml", None, [plutorun(LONG_NAME)], SETTINGS)
        assert d.binding is not None and d.binding.plutorun == LONG_NAME


# -- forks: the pods can open the run as the fork themselves ---------------------------------

FORK = {"runId": "llama-sft", "step": 1000, "inheritTags": True}


class TestForkEnv:
    def test_fork_plutorun_gives_every_container_the_fork(self) -> None:
        run = plutorun("lr-sweep", runId="lr-1e-4", fork=FORK)
        injector = PodInjector(SETTINGS, StaticView([run]), "native")
        original = pod({"pluto.dev/run": "lr-sweep"})
        result = apply(original, injector(PodRequest("u", "ml", original, False)).patch)
        env = env_of(result["spec"]["containers"][0])
        assert env["PLUTO_RUN_ID"] == "lr-1e-4"
        assert (env["PLUTO_FORK_RUN_ID"], env["PLUTO_FORK_STEP"]) == ("llama-sft", "1000")
        # The spec's inherit flags too: the fork is the same whoever opens it.
        assert (env["PLUTO_FORK_INHERIT_CONFIG"], env["PLUTO_FORK_INHERIT_TAGS"]) == (
            "true", "true")

    def test_plutorun_without_fork_adds_no_fork_variables(self) -> None:
        original = pod({"app": "x"})
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        assert "PLUTO_FORK_RUN_ID" not in env_of(result["spec"]["containers"][0])

    def test_container_with_its_own_run_id_is_not_told_to_fork_it(self) -> None:
        original = pod(env=[{"name": "PLUTO_RUN_ID", "value": "konduktor-job"}])
        forked = binding(run_id="lr-1e-4", fork_run_id="llama-sft", fork_step=1000)
        result = apply(original, injection_patch(original, forked, image="img",
                                                 placement="native"))
        env = env_of(result["spec"]["containers"][0])
        assert env["PLUTO_RUN_ID"] == "konduktor-job"
        assert "PLUTO_FORK_RUN_ID" not in env and "PLUTO_FORK_STEP" not in env

    def test_run_opened_without_the_fork_stops_the_fork_variables(self) -> None:
        """A fork added to the spec after the run was opened unforked cannot apply to it: the
        pods would name a fork that the server's run lacks, and be refused."""
        body: dict[str, Any] = {
                "metadata": {"name": "late", "namespace": "ml"},
                "spec": {"project": "llm", "fork": FORK},
                "status": {"runId": "late", "serverRunId": 3}}
        known = known_run(body)
        assert known is not None and known.fork is None
        d = decide(pod({"pluto.dev/run": "late"}), "ml", None, [known], SETTINGS)
        assert d.binding is not None and d.binding.fork_run_id is None
        body["status"]["forkedFrom"] = 1
        known = known_run(body)
        assert known is not None and known.fork is not None


# -- the opened run's identity wins over an edited spec --------------------------------------


def test_pods_keep_the_opened_runs_id_and_project_after_a_spec_edit() -> None:
    body: dict[str, Any] = {
        "metadata": {"name": "ddp-job", "namespace": "ml"},
        "spec": {"project": "ddp-examples"},
        "status": {"runId": "ddp-job", "project": "ddp-examples", "serverRunId": 1}}
    before = known_run(body)
    body["spec"] = {"project": "other-project", "runId": "renamed"}  # stored before the CRD rule
    after = known_run(body)
    for known in (before, after):
        assert known is not None
        d = decide(pod({"pluto.dev/run": "ddp-job"}), "ml", None, [known], SETTINGS)
        assert d.binding is not None
        assert (d.binding.run_id, d.binding.project) == ("ddp-job", "ddp-examples")
    # Not opened yet: the spec is all there is.
    del body["status"]
    fresh = known_run(body)
    assert fresh is not None and (fresh.run_id, fresh.project) == ("renamed", "other-project")


# -- the sidecar's securityContext -----------------------------------------------------------


def restricted_violations(p: dict[str, Any]) -> list[tuple[str, str]]:
    """The container checks of Pod Security Standard "restricted" (pod-security-admission)."""
    spec = p["spec"]
    pod_context = spec.get("securityContext") or {}
    found = []
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        context = container.get("securityContext") or {}
        name = container["name"]
        if context.get("allowPrivilegeEscalation") is not False:
            found.append((name, "allowPrivilegeEscalation"))
        if (context.get("capabilities") or {}).get("drop") != ["ALL"]:
            found.append((name, "capabilities"))
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append((name, "runAsNonRoot"))
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append((name, "runAsUser 0"))
        seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append((name, "seccompProfile"))
    return found


def restricted_pod(**container_context: Any) -> dict[str, Any]:
    p = pod({"pluto.dev/run": "sft"})
    p["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    p["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        **container_context}
    return p


def sidecar_of(p: dict[str, Any]) -> dict[str, Any]:
    containers = [*p["spec"].get("initContainers", []), *p["spec"]["containers"]]
    return next(c for c in containers if c["name"] == "pluto-sidecar")


class TestSidecarSecurity:
    @pytest.mark.parametrize("placement", ["native", "classic"])
    def test_injected_pod_still_meets_pod_security_restricted(self, placement: str) -> None:
        original = restricted_pod()
        assert restricted_violations(original) == []
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement=placement))  # type: ignore[arg-type]
        assert restricted_violations(result) == []

    def test_sidecar_meets_restricted_in_a_pod_that_sets_nothing(self) -> None:
        original = pod({"app": "x"})
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        assert sidecar_of(result)["securityContext"] == {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True}

    def test_sidecar_runs_as_the_apps_user_and_group(self) -> None:
        """The socket is created 0660: the app connects as its owner, without an fsGroup."""
        original = restricted_pod(runAsUser=1500)
        original["spec"]["securityContext"]["runAsGroup"] = 3000
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        context = sidecar_of(result)["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (1500, 3000)
        assert context["runAsNonRoot"] is True

    def test_pod_level_user_is_the_apps_too(self) -> None:
        original = pod()
        original["spec"]["securityContext"] = {"runAsUser": 2000}
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="classic"))
        context = sidecar_of(result)["securityContext"]
        assert context["runAsUser"] == 2000 and "runAsGroup" not in context

    def test_root_app_user_is_not_copied(self) -> None:
        original = pod()
        original["spec"]["containers"][0]["securityContext"] = {"runAsUser": 0}
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        context = sidecar_of(result)["securityContext"]
        assert "runAsUser" not in context and context["runAsNonRoot"] is True

    def test_pod_running_as_root_gets_no_run_as_non_root(self) -> None:
        """The sidecar would inherit the pod's uid 0: runAsNonRoot would stop it starting."""
        original = pod()
        original["spec"]["securityContext"] = {"runAsUser": 0}
        result = apply(original, injection_patch(original, binding(), image="img",
                                                 placement="native"))
        context = sidecar_of(result)["securityContext"]
        assert "runAsNonRoot" not in context and "runAsUser" not in context
        assert context["capabilities"] == {"drop": ["ALL"]}

    def test_containers_running_as_different_users_get_a_warning(self) -> None:
        original = pod({"pluto.dev/run": "sft"})
        original["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000}
        original["spec"]["containers"].append(
            {"name": "eval", "image": "x", "securityContext": {"runAsUser": 2000}})
        injector = PodInjector(SETTINGS, StaticView([plutorun("sft")]), "native")
        mutation = injector(PodRequest("u", "ml", original, False))
        result = apply(original, mutation.patch)
        assert sidecar_of(result)["securityContext"]["runAsUser"] == 1000  # the first's
        [warning] = [w for w in mutation.warnings if "different users" in w]
        assert "'eval': 2000" in warning or "eval: 2000" in warning
        assert len(warning) <= 256


# -- init containers of a native sidecar --------------------------------------------------------


def test_init_containers_after_a_native_sidecar_can_log_through_it() -> None:
    original = pod(initContainers=[
        {"name": "fetch", "image": "busybox", "command": ["true"]},
        {"name": "prep", "image": "busybox", "env": [{"name": "PLUTO_PROJECT", "value": "own"}],
         "volumeMounts": [{"name": "data", "mountPath": "/data"}]}])
    result = apply(original, injection_patch(original, binding(), image="img",
                                             placement="native"))
    sidecar, fetch, prep = result["spec"]["initContainers"]
    assert sidecar["name"] == "pluto-sidecar"
    for init in (fetch, prep):
        assert env_of(init)["PLUTO_RUN_ID"] == "sft"
        assert env_of(init)["PLUTO_SIDECAR_SOCKET"] == "/var/run/pluto/pluto.sock"
        assert {"name": "pluto-run", "mountPath": "/var/run/pluto"} in init["volumeMounts"]
    assert env_of(prep)["PLUTO_PROJECT"] == "own"  # never overridden
    assert prep["volumeMounts"][0] == {"name": "data", "mountPath": "/data"}


def test_init_containers_before_a_classic_sidecar_are_left_alone() -> None:
    original = pod(initContainers=[{"name": "fetch", "image": "busybox"}])
    result = apply(original, injection_patch(original, binding(), image="img",
                                             placement="classic"))
    assert result["spec"]["initContainers"] == [{"name": "fetch", "image": "busybox"}]


# -- ties, namespaces, annotations, envFrom -----------------------------------------------------


def test_plutoruns_created_in_the_same_second_are_picked_by_name() -> None:
    """Every webhook replica answers the same, whatever order its cache lists them in."""
    a = plutorun("run-a", selector={"matchLabels": {"app": "t"}})
    b = plutorun("run-b", selector={"matchLabels": {"app": "t"}})
    for runs in ([a, b], [b, a]):
        d = decide(pod({"app": "t"}), "ml", None, runs, SETTINGS)
        assert d.binding is not None and d.binding.plutorun == "run-a"


def test_pods_outside_the_watched_namespaces_are_not_injected() -> None:
    watching = OperatorSettings(namespaces=("ml",))
    enabled = NamespaceInfo({"pluto.dev/inject": "enabled"})
    jobset_pod = pod({"jobset.sigs.k8s.io/jobset-name": "js"})
    assert decide(jobset_pod, "research", enabled, [], watching).binding is None
    labelled = pod({"pluto.dev/run": "sft"})
    assert decide(labelled, "research", None, [plutorun("sft", namespace="research")],
                  watching).binding is None
    assert decide(jobset_pod, "ml", enabled, [], watching).binding is not None
    # No --namespace: every namespace is watched.
    assert decide(jobset_pod, "research", enabled, [], SETTINGS).binding is not None


@pytest.mark.parametrize("annotation", ["LLaMA finetune", "-leading-dash", "x" * 101, "a/b"])
def test_invalid_project_annotation_is_ignored_with_a_warning(annotation: str) -> None:
    jobset_pod = pod({"jobset.sigs.k8s.io/jobset-name": "js"})
    info = NamespaceInfo({"pluto.dev/inject": "enabled"}, {"pluto.dev/project": annotation})
    d = decide(jobset_pod, "team-a", info, [], SETTINGS)
    assert d.binding is not None and d.binding.project == "team-a"  # as if absent
    [warning] = d.warnings
    assert "pluto.dev/project" in warning and "kubectl annotate" in warning
    assert len(warning) <= 256
    custom = OperatorSettings(default_project="shared")
    d = decide(jobset_pod, "team-a", info, [], custom)
    assert d.binding is not None and d.binding.project == "shared"


def test_valid_project_annotation_gives_no_warning() -> None:
    jobset_pod = pod({"jobset.sigs.k8s.io/jobset-name": "js"})
    info = NamespaceInfo({"pluto.dev/inject": "enabled"}, {"pluto.dev/project": "LLaMA-ft.v2"})
    d = decide(jobset_pod, "team-a", info, [], SETTINGS)
    assert d.binding is not None and d.binding.project == "LLaMA-ft.v2" and d.warnings == []


def test_container_with_env_from_is_warned_by_name() -> None:
    original = pod({"pluto.dev/run": "sft"})
    original["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "run-ids"}}]
    original["spec"]["containers"].append(
        {"name": "metrics", "image": "x", "envFrom": [{"prefix": "METRICS_",
                                                       "configMapRef": {"name": "m"}}]})
    original["spec"]["containers"].append(
        {"name": "own", "image": "x", "envFrom": [{"configMapRef": {"name": "o"}}],
         "env": [{"name": "PLUTO_RUN_ID", "value": "mine"}]})
    injector = PodInjector(SETTINGS, StaticView([plutorun("sft")]), "native")
    mutation = injector(PodRequest("u", "ml", original, False))
    envfrom = [w for w in mutation.warnings if "envFrom" in w]
    assert len(envfrom) == 1 and "'trainer'" in envfrom[0]
    assert len(envfrom[0]) <= 256
