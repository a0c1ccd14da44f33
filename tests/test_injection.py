"""The webhook's decision and patch, on pod specs: who is covered, and what a pod gets.

Every test applies the returned JSON patch the way the API server does (RFC 6902) and looks at
the resulting pod, so a patch that is well-meant but malformed (a wrong path, an ``add`` onto a
missing list) fails here rather than in a cluster.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from pluto_operator.admission import PodRequest, review
from pluto_operator.injection import injection_patch, is_injected, quantity_bytes
from pluto_operator.model import PlutoRun
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
        assert env["PLUTO_API_KEY"] == {"secretKeyRef": {
            "name": "pluto-api-key", "key": "k", "optional": True}}
        assert env["PLUTO_NODE_RANK"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")
        assert env["PLUTO_SPOOL_DIR"] == "/var/run/pluto/spool"
        app = result["spec"]["containers"][0]
        assert env_of(app) == {"PLUTO_RUN_ID": "sft", "PLUTO_PROJECT": "llm",
                               "PLUTO_SIDECAR_SOCKET": "/var/run/pluto/pluto.sock"}
        assert "PLUTO_API_KEY" not in env_of(app)  # credentials stay with the sidecar
        assert {"name": "pluto-run", "mountPath": "/var/run/pluto"} in app["volumeMounts"]
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
        assert quantity_bytes(text) == expected


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
