"""The webhook on real pod specs: what each kind of training pod gets, and what it keeps.

The pods come from tests/support/pod_specs.py: a Konduktor task's pod rendered with
konduktor-nightly's own templates, a JobSet pod, an Indexed Job pod, a Kubeflow PyTorchJob pod,
a pod that already sets ``PLUTO_RUN_ID``, and one nobody opted in. Each goes through the real
admission path (``admission.review`` + ``PodInjector``); the answer's patch is applied as the API
server applies it, and the result must still be a valid v1 Pod for Kubernetes 1.28-1.33.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from support import pod_specs
from support.admission import apply_answer, patch_of, pod_review

from pluto_operator.admission import review
from pluto_operator.injection import Placement
from pluto_operator.model import PlutoRun
from pluto_operator.settings import OperatorSettings
from pluto_operator.targets import KnownRun, NamespaceInfo
from pluto_operator.webhook import PodInjector

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSIONS = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]
NS = pod_specs.NAMESPACE
SETTINGS = OperatorSettings(server_url="http://pluto-server.pluto.svc:7300",
                            sidecar_image="ghcr.io/pluto-dev/pluto:0.1.0")


def example_plutoruns() -> list[KnownRun]:
    """Every PlutoRun in examples/, as the webhook's cache holds them, plus one for the
    PyTorchJob (the examples have none)."""
    known = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "PlutoRun":
                doc["metadata"]["namespace"] = NS
                known.append(KnownRun(doc["metadata"]["name"], NS, "2026-01-01T00:00:00Z",
                                      PlutoRun.model_validate(doc)))
    pytorch = PlutoRun.model_validate({
        "metadata": {"name": "mnist", "namespace": NS},
        "spec": {"project": "mnist", "selector": {"matchLabels": {
            "training.kubeflow.org/job-name": "mnist-ddp"}}},
    })
    known.append(KnownRun("mnist", NS, "2026-01-02T00:00:00Z", pytorch))
    return known


class View:
    def __init__(self, namespaces: dict[str, NamespaceInfo]) -> None:
        self._runs = example_plutoruns()
        self._namespaces = namespaces

    def namespace(self, name: str) -> NamespaceInfo | None:
        return self._namespaces.get(name)

    def runs(self, namespace: str) -> list[KnownRun]:
        return [r for r in self._runs if r.namespace == namespace]


ENABLED = NamespaceInfo({"pluto.dev/inject": "enabled"}, {"pluto.dev/project": "konduktor"})


def admit(pod: dict[str, Any], *, namespace_enabled: bool = False,
          placement: Placement = "native") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the stored pod, the admission response) for a pod CREATE in the test namespace."""
    view = View({NS: ENABLED} if namespace_enabled else {})
    injector = PodInjector(SETTINGS, view, placement)
    answer = json.loads(review(json.dumps(pod_review(pod, NS)).encode(), injector).body)
    assert answer["response"]["allowed"] is True
    return apply_answer(pod, answer), answer["response"]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    found = [c for c in [*spec.get("initContainers", []), *spec["containers"]]
             if c["name"] == "pluto-sidecar"]
    assert len(found) == 1
    sidecar: dict[str, Any] = found[0]
    return sidecar


def assert_valid_pod(pod: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            raise AssertionError(f"{version}: {path}: {error.message}") from None


def assert_app_containers_wired(pod: dict[str, Any], run_id: str, project: str) -> None:
    for container in pod["spec"]["containers"]:
        if container["name"] == "pluto-sidecar":
            continue
        e = env(container)
        assert e["PLUTO_RUN_ID"] == run_id, container["name"]
        assert e["PLUTO_PROJECT"] == project
        assert e["PLUTO_SIDECAR_SOCKET"] == "/var/run/pluto/pluto.sock"
        assert "PLUTO_API_KEY" not in e
        assert {"name": "pluto-run", "mountPath": "/var/run/pluto"} in container["volumeMounts"]


@pytest.mark.parametrize("placement", ["native", "classic"])
def test_konduktor_pod_in_an_opted_in_namespace(placement: Placement) -> None:
    original = pod_specs.konduktor_pod(rank=1)
    jobset = original["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"]
    assert env(original["spec"]["containers"][0])["PLUTO_RUN_ID"] == jobset  # Konduktor's own
    pod, response = admit(original, namespace_enabled=True, placement=placement)
    assert "warnings" not in response  # Konduktor's PLUTO_RUN_ID equals the JobSet name
    assert_app_containers_wired(pod, jobset, "konduktor")
    assert pod["metadata"]["labels"]["pluto.dev/run"] == jobset
    assert pod["metadata"]["labels"]["parent"] == "trainy"
    sidecar = sidecar_of(pod)
    assert ("restartPolicy" in sidecar) is (placement == "native")
    assert_valid_pod(pod)


def test_konduktor_pod_elsewhere_is_left_alone() -> None:
    original = pod_specs.konduktor_pod()
    pod, response = admit(original, namespace_enabled=False)
    assert pod == original and "patch" not in response


def test_jobset_pod_is_covered_by_the_plutorun_selector() -> None:
    pod, _ = admit(pod_specs.jobset_pod(1, job_index=0))
    assert pod["metadata"]["annotations"]["pluto.dev/injected"] == "ddp-jobset"
    assert_app_containers_wired(pod, "ddp-jobset", "ddp-examples")
    rank = env(sidecar_of(pod))["PLUTO_NODE_RANK"]
    assert rank["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
    assert_valid_pod(pod)


def test_indexed_job_pod_is_covered_by_its_label() -> None:
    original = pod_specs.indexed_job_pod(1)
    assert original["metadata"]["labels"]["pluto.dev/run"] == "ddp-job"
    pod, _ = admit(original)
    assert_app_containers_wired(pod, "ddp-job", "ddp-examples")
    init = pod["spec"]["initContainers"]
    assert init[0]["name"] == "pluto-sidecar" and init[0]["restartPolicy"] == "Always"
    assert_valid_pod(pod)


@pytest.mark.parametrize("replica", ["master", "worker"])
def test_pytorchjob_pods_are_covered_by_a_selector(replica: str) -> None:
    pod, _ = admit(pod_specs.pytorchjob_pod(replica, 0))
    assert_app_containers_wired(pod, "mnist", "mnist")
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["pytorch"]  # the training-operator's container, untouched otherwise
    assert_valid_pod(pod)


def test_pod_that_sets_its_own_run_id_keeps_it_and_is_told() -> None:
    original = pod_specs.pod_with_run_id("preset-run-7")
    pod, response = admit(original)
    container = pod["spec"]["containers"][0]
    assert env(container)["PLUTO_RUN_ID"] == "preset-run-7"
    assert [e["name"] for e in container["env"]].count("PLUTO_RUN_ID") == 1
    assert any("PLUTO_RUN_ID='preset-run-7'" in w for w in response["warnings"])
    assert_valid_pod(pod)


def test_already_injected_pod_gets_nothing_more() -> None:
    once, _ = admit(pod_specs.indexed_job_pod(0))
    twice, response = admit(once)
    assert patch_of({"response": response}) == []
    assert twice == once


def test_pod_nobody_opted_in_is_left_alone() -> None:
    original = pod_specs.plain_pod()
    pod, response = admit(original, namespace_enabled=True)
    assert pod == original
    assert response == {"uid": response["uid"], "allowed": True}
