"""The emulated Kubernetes API server that operator tests run against.

First the semantics the operator relies on (each pinned against the emulator over HTTP, as
kopf and the python client see them), then the proof that counts: the real ``kopf run`` in a
subprocess, with a tiny probe operator, doing a PlutoRun's whole life against it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import psutil
import pytest
from support.kube_emulator import (
    CRDS,
    EVENTS,
    NAMESPACES,
    PLUTORUNS,
    PODS,
    KubeApiError,
    KubeEmulator,
    OperatorProcess,
    wait_for,
)

PROBE_OPERATOR = Path(__file__).parent / "scripts" / "kopf_probe_operator.py"
PROBE_FINALIZER = "probe.pluto.dev/cleanup"
CONFIGMAPS = "v1/configmaps"


def pod(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}


def plutorun(name: str, namespace: str = "default", **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "pluto.dev/v1alpha1", "kind": "PlutoRun",
            "metadata": {"name": name, "namespace": namespace, **metadata},
            "spec": {"project": "probe"}}


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def api_error(call: Callable[[], object]) -> KubeApiError:
    with pytest.raises(KubeApiError) as caught:
        call()
    return caught.value


# -- discovery and version -----------------------------------------------------------


def test_discovery_lists_the_resources_the_operator_uses(kube_emulator: KubeEmulator) -> None:
    def resources(path: str) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in kube_emulator.request("GET", path)["resources"]}

    assert kube_emulator.request("GET", "/api")["versions"] == ["v1"]
    core = resources("/api/v1")
    assert {"pods", "namespaces", "events", "secrets", "services", "configmaps"} <= set(core)
    assert core["namespaces"]["namespaced"] is False
    assert core["pods"]["namespaced"] is True and "pods/status" in core

    groups = {g["name"] for g in kube_emulator.request("GET", "/apis")["groups"]}
    assert {"pluto.dev", "jobset.x-k8s.io", "batch", "events.k8s.io", "coordination.k8s.io",
            "admissionregistration.k8s.io", "apiextensions.k8s.io"} <= groups

    runs = resources("/apis/pluto.dev/v1alpha1")
    assert runs["plutoruns"]["kind"] == "PlutoRun"
    assert runs["plutoruns"]["namespaced"] is True
    assert runs["plutoruns"]["shortNames"] == ["prun"]
    assert {"list", "watch", "patch", "create", "delete"} <= set(runs["plutoruns"]["verbs"])
    assert "plutoruns/status" in runs
    assert resources("/apis/jobset.x-k8s.io/v1alpha2")["jobsets"]["kind"] == "JobSet"
    assert "jobs" in resources("/apis/batch/v1")
    assert "events" in resources("/apis/events.k8s.io/v1")
    assert "leases" in resources("/apis/coordination.k8s.io/v1")
    webhooks = resources("/apis/admissionregistration.k8s.io/v1")
    assert webhooks["mutatingwebhookconfigurations"]["namespaced"] is False
    assert "customresourcedefinitions" in resources("/apis/apiextensions.k8s.io/v1")

    crd_names = {c["metadata"]["name"] for c in kube_emulator.list_objects(CRDS)}
    assert {"plutoruns.pluto.dev", "jobsets.jobset.x-k8s.io"} <= crd_names


def test_version_reports_the_configured_git_version(
    kube_emulator: KubeEmulator, kube_emulator_factory: Callable[..., KubeEmulator]
) -> None:
    version = kube_emulator.version()
    assert (version["gitVersion"], version["major"], version["minor"]) == ("v1.31.0", "1", "31")

    old = kube_emulator_factory(git_version="v1.28.3-gke.100").version()
    assert (old["gitVersion"], old["minor"]) == ("v1.28.3-gke.100", "28")


# -- objects -------------------------------------------------------------------------


def test_the_seeded_namespaces_exist_and_are_active(kube_emulator: KubeEmulator) -> None:
    namespaces = {ns["metadata"]["name"]: ns for ns in kube_emulator.list_objects(NAMESPACES)}
    assert set(namespaces) == {"default", "kube-system"}
    default = kube_emulator.get(NAMESPACES, "default")
    assert default["status"]["phase"] == "Active"
    assert default["metadata"]["labels"]["kubernetes.io/metadata.name"] == "default"


def test_create_sets_the_server_fields_and_refuses_what_the_api_refuses(
    kube_emulator: KubeEmulator,
) -> None:
    created = kube_emulator.create(PLUTORUNS, {**plutorun("r1"), "status": {"phase": "Bogus"}})
    meta = created["metadata"]
    assert meta["namespace"] == "default" and meta["generation"] == 1
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and rv(created) > 0
    assert "status" not in created  # create cannot set status when there is a subresource
    assert kube_emulator.get(PLUTORUNS, "r1", namespace="default") == created

    assert api_error(lambda: kube_emulator.create(PLUTORUNS, plutorun("r1"))).status == 409
    missing_ns = api_error(lambda: kube_emulator.create(PLUTORUNS, plutorun("r2", "nowhere")))
    assert missing_ns.status == 404
    assert api_error(lambda: kube_emulator.create(PLUTORUNS, plutorun("Not_A_Name"))).status == 422
    bad_label = pod("p", **{"pluto.dev/run": "has spaces"})
    assert api_error(lambda: kube_emulator.create(PODS, bad_label)).status == 422

    generated = kube_emulator.create(EVENTS, {"metadata": {"generateName": "probe-",
                                                           "namespace": "default"}})
    assert generated["metadata"]["name"].startswith("probe-")
    assert len(generated["metadata"]["name"]) == len("probe-") + 5


def test_list_filters_by_label_and_field_selectors(kube_emulator: KubeEmulator) -> None:
    kube_emulator.create(PODS, pod("a", **{"pluto.dev/run": "x"}))
    kube_emulator.create(PODS, pod("b", **{"pluto.dev/run": "y"}))
    kube_emulator.create(PODS, pod("c"))
    kube_emulator.create(PODS, pod("d", "kube-system", **{"pluto.dev/run": "x"}))

    def names(selector: str, namespace: str | None = "default") -> list[str]:
        found = kube_emulator.list_objects(PODS, namespace=namespace, label_selector=selector)
        return sorted(p["metadata"]["name"] for p in found)

    raw = kube_emulator.request("GET", "/api/v1/namespaces/default/pods",
                                params={"labelSelector": "pluto.dev/run=x"})
    assert [p["metadata"]["name"] for p in raw["items"]] == ["a"]
    assert names("pluto.dev/run=x", namespace=None) == ["a", "d"]
    assert names("pluto.dev/run==y") == ["b"]
    assert names("pluto.dev/run!=x") == ["b", "c"]
    assert names("pluto.dev/run in (x, y)") == ["a", "b"]
    assert names("pluto.dev/run notin (x)") == ["b", "c"]
    assert names("pluto.dev/run") == ["a", "b"]
    assert names("!pluto.dev/run") == ["c"]
    assert names("pluto.dev/run=x,pluto.dev/run=y") == []
    by_name = kube_emulator.list_objects(PODS, field_selector="metadata.name=b")
    assert [p["metadata"]["name"] for p in by_name] == ["b"]
    assert api_error(lambda: names("pluto.dev/run in x")).status == 400


def test_status_subresource_keeps_status_and_the_rest_apart(kube_emulator: KubeEmulator) -> None:
    kube_emulator.create(PLUTORUNS, plutorun("r"))

    main = kube_emulator.patch(PLUTORUNS, "r", {"spec": {"project": "q"},
                                                "status": {"phase": "Ignored"}},
                               namespace="default")
    assert main["spec"]["project"] == "q" and "status" not in main
    assert main["metadata"]["generation"] == 2

    status = kube_emulator.patch(PLUTORUNS, "r", {"status": {"phase": "Pending"},
                                                  "spec": {"project": "ignored"}},
                                 namespace="default", subresource="status")
    assert status["status"] == {"phase": "Pending"} and status["spec"]["project"] == "q"
    assert status["metadata"]["generation"] == 2  # status changes do not count
    assert kube_emulator.request("GET", kube_emulator.path(
        PLUTORUNS, "default", "r", "status"))["status"] == {"phase": "Pending"}

    kube_emulator.create(CONFIGMAPS, {"metadata": {"name": "c", "namespace": "default"}})
    no_status = api_error(lambda: kube_emulator.patch(
        CONFIGMAPS, "c", {"status": {}}, namespace="default", subresource="status"))
    assert no_status.status == 404


def test_a_json_patch_guarded_by_a_stale_resource_version_is_refused(
    kube_emulator: KubeEmulator,
) -> None:
    stale = kube_emulator.create(PLUTORUNS, plutorun("r"))
    kube_emulator.patch(PLUTORUNS, "r", {"spec": {"project": "q"}}, namespace="default")

    def add_finalizer(version: str) -> dict[str, Any]:
        ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": version},
               {"op": "add", "path": "/metadata/finalizers", "value": ["x.dev/f"]}]
        return kube_emulator.patch(PLUTORUNS, "r", ops, namespace="default", patch_type="json")

    refused = api_error(lambda: add_finalizer(stale["metadata"]["resourceVersion"]))
    assert refused.status == 422  # what kopf expects, to retry on its next cycle
    assert "finalizers" not in kube_emulator.get(PLUTORUNS, "r", namespace="default")["metadata"]

    fresh = kube_emulator.get(PLUTORUNS, "r", namespace="default")
    assert add_finalizer(fresh["metadata"]["resourceVersion"])["metadata"]["finalizers"] == [
        "x.dev/f"]

    conflict = api_error(lambda: kube_emulator.patch(
        PLUTORUNS, "r", {"metadata": {"resourceVersion": stale["metadata"]["resourceVersion"],
                                      "labels": {"a": "b"}}}, namespace="default"))
    assert conflict.status == 409
    strategic = api_error(lambda: kube_emulator.patch(
        PLUTORUNS, "r", {"spec": {}}, namespace="default", patch_type="strategic"))
    assert strategic.status == 415  # as on a real server: custom resources take no SMP


def test_a_patch_that_changes_nothing_is_not_a_change(kube_emulator: KubeEmulator) -> None:
    created = kube_emulator.create(CONFIGMAPS, {"metadata": {"name": "c", "namespace": "default"},
                                                "data": {"a": "1"}})
    writes = len(kube_emulator.changes())
    same = kube_emulator.patch(CONFIGMAPS, "c", {"data": {"a": "1"}}, namespace="default")
    assert rv(same) == rv(created)
    assert len(kube_emulator.changes()) == writes
    changed = kube_emulator.patch(CONFIGMAPS, "c", {"data": {"a": None, "b": "2"}},
                                  namespace="default")
    assert changed["data"] == {"b": "2"} and rv(changed) > rv(created)


def test_finalizers_hold_a_deleted_object_until_the_last_is_removed(
    kube_emulator: KubeEmulator,
) -> None:
    created = kube_emulator.create(PLUTORUNS, plutorun("r", finalizers=["a.dev/x", "b.dev/y"]))
    with kube_emulator.watch(PLUTORUNS, namespace="default",
                             resource_version=created["metadata"]["resourceVersion"]) as stream:
        answer = kube_emulator.delete(PLUTORUNS, "r", namespace="default")
        assert answer["metadata"]["deletionTimestamp"]
        held = kube_emulator.get(PLUTORUNS, "r", namespace="default")
        assert held["metadata"]["deletionTimestamp"] and held["metadata"]["finalizers"]

        added = api_error(lambda: kube_emulator.patch(
            PLUTORUNS, "r", {"metadata": {"finalizers": ["a.dev/x", "b.dev/y", "c.dev/z"]}},
            namespace="default"))
        assert added.status == 422  # no new finalizers while deleting

        kube_emulator.patch(PLUTORUNS, "r", {"metadata": {"finalizers": ["b.dev/y"]}},
                            namespace="default")
        assert kube_emulator.find(PLUTORUNS, "r", namespace="default") is not None
        kube_emulator.patch(PLUTORUNS, "r", [{"op": "remove", "path": "/metadata/finalizers"}],
                            namespace="default", patch_type="json")
        assert kube_emulator.find(PLUTORUNS, "r", namespace="default") is None
        events = stream.take(3)
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["deletionTimestamp"]
    assert events[1]["object"]["metadata"]["finalizers"] == ["b.dev/y"]

    kube_emulator.create(PLUTORUNS, plutorun("plain"))
    kube_emulator.delete(PLUTORUNS, "plain", namespace="default")
    assert kube_emulator.find(PLUTORUNS, "plain", namespace="default") is None


# -- watching ------------------------------------------------------------------------


def test_watch_delivers_added_modified_deleted_in_order(kube_emulator: KubeEmulator) -> None:
    start = kube_emulator.request("GET", kube_emulator.path(PODS, "default"))
    since = start["metadata"]["resourceVersion"]
    with kube_emulator.watch(PODS, namespace="default", resource_version=since) as stream:
        kube_emulator.create(PODS, pod("elsewhere", "kube-system"))  # another namespace
        kube_emulator.create(PODS, pod("p"))
        kube_emulator.patch(PODS, "p", {"metadata": {"labels": {"a": "b"}}}, namespace="default")
        kube_emulator.delete(PODS, "p", namespace="default")
        events = stream.take(3)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    assert events[1]["object"]["metadata"]["labels"] == {"a": "b"}
    versions = [rv(e["object"]) for e in events]
    assert versions == sorted(set(versions)) and versions[0] > int(since)


def test_watch_resumes_after_a_resource_version(kube_emulator: KubeEmulator) -> None:
    kube_emulator.create(PODS, pod("p"))
    first = kube_emulator.patch(PODS, "p", {"metadata": {"labels": {"n": "1"}}},
                                namespace="default")
    kube_emulator.patch(PODS, "p", {"metadata": {"labels": {"n": "2"}}}, namespace="default")

    with kube_emulator.watch(PODS, namespace="default",
                             resource_version=first["metadata"]["resourceVersion"]) as stream:
        [resumed] = stream.take(1)
    assert resumed["type"] == "MODIFIED"
    assert resumed["object"]["metadata"]["labels"] == {"n": "2"}

    with kube_emulator.watch(PODS, namespace="default") as stream:  # no version: current state
        [current] = stream.take(1)
    assert current["type"] == "ADDED"
    assert current["object"]["metadata"]["labels"] == {"n": "2"}


def test_a_selective_watch_sees_objects_enter_and_leave_its_selector(
    kube_emulator: KubeEmulator,
) -> None:
    with kube_emulator.watch(PODS, namespace="default",
                             label_selector="pluto.dev/run=x") as stream:
        kube_emulator.create(PODS, pod("other", **{"pluto.dev/run": "y"}))
        kube_emulator.create(PODS, pod("p"))
        kube_emulator.patch(PODS, "p", {"metadata": {"labels": {"pluto.dev/run": "x"}}},
                            namespace="default")
        kube_emulator.patch(PODS, "p", {"metadata": {"labels": {"pluto.dev/run": "z"}}},
                            namespace="default")
        events = stream.take(2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "p"), ("DELETED", "p")]


def test_watch_ends_after_timeout_seconds_and_sends_bookmarks(
    kube_emulator_factory: Callable[..., KubeEmulator],
) -> None:
    emulator = kube_emulator_factory(bookmark_interval=0.2)
    with emulator.watch(PODS, namespace="default", allowWatchBookmarks="true") as stream:
        bookmark = stream.next()
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["resourceVersion"]

    with emulator.watch(PODS, namespace="default", timeoutSeconds="1") as stream, \
            pytest.raises(EOFError):
        stream.next()


# -- a CRD through the API -----------------------------------------------------------


def test_a_crd_created_through_the_api_is_served(
    kube_emulator: KubeEmulator, kube_emulator_factory: Callable[..., KubeEmulator],
    tmp_path: Path,
) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Cluster",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True}]},
    }
    assert api_error(lambda: kube_emulator.request("GET", "/apis/example.com/v1")).status == 404
    kube_emulator.create(CRDS, crd)
    conditions = kube_emulator.get(CRDS, "widgets.example.com")["status"]["conditions"]
    assert {"type": "Established", "status": "True"}.items() <= conditions[-1].items()
    [widgets] = kube_emulator.request("GET", "/apis/example.com/v1")["resources"]
    assert (widgets["name"], widgets["kind"], widgets["namespaced"]) == ("widgets", "Widget",
                                                                       False)
    kube_emulator.create("example.com/v1/widgets", {"metadata": {"name": "w"}})
    assert kube_emulator.get("example.com/v1/widgets", "w")["kind"] == "Widget"

    kube_emulator.delete(CRDS, "widgets.example.com")
    assert api_error(lambda: kube_emulator.get("example.com/v1/widgets", "w")).status == 404

    crd_file = tmp_path / "widgets.yaml"
    crd_file.write_text(json.dumps(crd))
    from_file = kube_emulator_factory(crds=[crd_file])
    assert from_file.list_objects("example.com/v1/widgets") == []


# -- clients and process -------------------------------------------------------------


def test_requests_without_the_token_are_unauthorized(kube_emulator: KubeEmulator) -> None:
    anonymous = httpx.get(kube_emulator.url + "/api/v1/namespaces", trust_env=False)
    assert anonymous.status_code == 401 and anonymous.json()["kind"] == "Status"
    wrong = httpx.get(kube_emulator.url + "/api/v1/namespaces", trust_env=False,
                      headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(kube_emulator.url + "/version", trust_env=False).status_code == 200


def test_the_kubernetes_python_client_reads_the_kubeconfig(kube_emulator: KubeEmulator) -> None:
    env = kube_emulator.env
    assert env["KUBECONFIG"] == str(kube_emulator.kubeconfig)
    assert "KUBERNETES_SERVICE_HOST" not in env
    client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=env["KUBECONFIG"])
    try:
        core: Any = kubernetes.client.CoreV1Api(client)  # its models' Optional fields: Any
        assert {"default", "kube-system"} <= {n.metadata.name for n in core.list_namespace().items}
        created = core.create_namespaced_pod("default", pod("p", **{"pluto.dev/run": "x"}))
        assert created.metadata.uid
        # kubernetes>=37 sends a JSON patch by default: a dict needs an explicit content type,
        # on a real API server as here.
        core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"extra": "1"}}},
                                  _content_type="application/strategic-merge-patch+json")
        [listed] = core.list_namespaced_pod("default", label_selector="pluto.dev/run=x").items
        assert listed.metadata.labels == {"pluto.dev/run": "x", "extra": "1"}

        custom: Any = kubernetes.client.CustomObjectsApi(client)
        custom.create_namespaced_custom_object("pluto.dev", "v1alpha1", "default", "plutoruns",
                                               plutorun("r"))
        patched = custom.patch_namespaced_custom_object_status(
            "pluto.dev", "v1alpha1", "default", "plutoruns", "r", {"status": {"phase": "Running"}})
        assert patched["status"] == {"phase": "Running"}
        assert kubernetes.client.VersionApi(client).get_code().git_version == "v1.31.0"
    finally:
        client.close()


def test_the_emulator_listens_on_loopback_and_stops_cleanly(
    kube_emulator_factory: Callable[..., KubeEmulator],
) -> None:
    emulator = kube_emulator_factory()
    assert emulator.pid is not None
    listening = [c.laddr for c in psutil.Process(emulator.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}
    assert {addr.port for addr in listening} == {emulator.port}

    assert emulator.stop() == 0  # SIGTERM: a clean exit, open watches closed
    assert not emulator.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(emulator.url + "/version", trust_env=False)


# -- the real kopf ---------------------------------------------------------------------


def test_kopf_runs_a_probe_operator_against_the_emulator(
    kube_emulator: KubeEmulator, tmp_path: Path
) -> None:
    kube_emulator.create(PLUTORUNS, plutorun("early"))  # found by kopf's initial LIST
    kopf = OperatorProcess(
        [str(Path(sys.executable).with_name("kopf")), "run", "--standalone", "--all-namespaces",
         "--verbose", str(PROBE_OPERATOR)],
        env={**kube_emulator.env, "PROBE_MARKER_DIR": str(tmp_path)},
        log_path=tmp_path / "kopf.log")
    with kopf:
        kube_emulator.wait_watching(PLUTORUNS)
        kube_emulator.create(PLUTORUNS, plutorun("late"))  # arrives through the WATCH

        for name in ("early", "late"):
            def handled(name: str = name) -> dict[str, Any]:
                run = kube_emulator.get(PLUTORUNS, name, namespace="default")
                return run if run.get("status", {}).get("phase") == "Pending" else {}

            run = wait_for(handled, 20, message=kopf.logs)
            assert run["status"]["namespacesSeen"] == ["default", "kube-system"]  # the index
            assert run["metadata"]["finalizers"] == [PROBE_FINALIZER]

            def posted(name: str = name) -> list[dict[str, Any]]:
                return [e for e in kube_emulator.list_objects(EVENTS, namespace="default")
                        if e["involvedObject"]["name"] == name and e["reason"] == "ProbeCreated"]

            wait_for(posted, 10, message=kopf.logs)

        kube_emulator.delete(PLUTORUNS, "late", namespace="default")
        wait_for(lambda: kube_emulator.find(PLUTORUNS, "late", namespace="default") is None, 20,
                 message=kopf.logs)
        assert (tmp_path / "deleted-default-late").exists()  # the handler ran before it went
        held = [c for c in kube_emulator.changes() if c["name"] == "late"
                and c["object"]["metadata"].get("deletionTimestamp")]
        assert [c["type"] for c in held][-1] == "DELETED" and len(held) >= 2

    assert kopf.returncode == 0, kopf.logs()
    assert kopf.tracebacks() == [], kopf.logs()
    requests = kube_emulator.requests_log()
    assert [r for r in requests if (r["status"] or 0) >= 500] == []
    status_patches = [r for r in requests if r["method"] == "PATCH"
                      and r["path"].endswith("/plutoruns/late/status")]
    assert status_patches and status_patches[0]["contentType"] == "application/merge-patch+json"
    assert any(r["contentType"] == "application/json-patch+json" and r["status"] == 200
               for r in requests)
