"""The chart's RBAC against the API calls the code really makes.

Each role of the chart runs as the chart runs it (``pluto operator --role reconciler`` and
``--role webhook`` with its certificate files, no ``--dev``) against an emulated API server of
its own, through the scenarios ``tests/test_operator.py`` drives: a PlutoRun opened, followed
through its Job and its JobSet, its spec changed, deleted (finalizer), a refused fork; a JobSet
in an opted-in namespace; pods admitted by the webhook, one with a warning (an event on its
Job). The emulator records every request with its user agent, so the role's own requests are
told from the test's. Each request becomes (apiGroup, resource, verb), the way the API server
authorizes it.

What holds, for each role: every (apiGroup, resource, verb) the code used is granted to the
role's ServiceAccount by the rendered chart, and the chart grants nothing else, except what
``JUSTIFIED_EXTRAS`` lists with the reason the emulator cannot show it (nothing at present:
the scenarios reach every verb the code calls). Found: the reconciler patched JobSets (kopf's
annotations) without the grant, and the chart granted 13 verbs the reconciler never used
(get/watch on pods, list/watch on Jobs, update on PlutoRuns, events.k8s.io ...); the webhook's
events on a pod's owner were never posted (kopf's event queue was looked up in the wrong
context), so its ``create`` on events could not be seen either, until fixed.
"""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.admission import pod_review
from support.kube_emulator import (
    EVENTS,
    JOBS,
    JOBSETS,
    NAMESPACES,
    PLUTORUNS,
    PODS,
    KubeEmulator,
    OperatorProcess,
    wait_for,
)
from support.postgres import free_port
from support.server_process import ServerProcess
from test_chart import Scenario, grants_of, install, pod_templates

from pluto_operator.certs import self_signed, write_certificate

ROOT = Path(__file__).resolve().parent.parent
NS = "ml"
Use = tuple[str, str, str]  # (apiGroup, resource, verb)

#: Granted though the scenarios do not make the request, each with the reason it is needed.
JUSTIFIED_EXTRAS: dict[str, dict[Use, str]] = {
    "operator": {},
    "webhook": {},
}


# -- requests to (apiGroup, resource, verb) -------------------------------------------------


def use_of(entry: dict[str, Any]) -> Use | None:
    """How the API server authorizes a request; None for discovery (not a resource)."""
    parts = [p for p in entry["path"].split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /version, /api, /apis, /openapi...: non-resource URLs
    if not rest:
        return None  # /apis/GROUP/VERSION: discovery
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]  # a namespaced resource: the namespace is the binding's business
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2:3]
    if sub:
        resource = f"{resource}/{sub[0]}"
    method = entry["method"]
    if method == "GET":
        verb = ("watch" if str(entry["query"].get("watch", "")).lower() in ("1", "true")
                else "get" if name else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}[method]
    return group, resource, verb


def uses_of(kube: KubeEmulator) -> set[Use]:
    """What the operator asked for: requests made by anything but the test's own httpx."""
    found = set()
    for entry in kube.requests_log():
        agent = entry.get("userAgent") or ""
        if agent.startswith("python-httpx"):
            continue
        use = use_of(entry)
        if use is not None:
            found.add(use)
    return found


def chart_grants(component: str) -> set[Use]:
    """What the default release grants the component's ServiceAccount (bound cluster-wide)."""
    release = install(Scenario({}))
    account = pod_templates(release)[release.named(component)]["spec"]["serviceAccountName"]
    grants = grants_of(release, account)
    assert {where for where, *_ in grants} == {"cluster"}
    return {(group, resource, verb) for _, group, resource, verb in grants}


# -- the roles, as the chart runs them ----------------------------------------------------


def start_role(kube: KubeEmulator, server: ServerProcess, tmp_path: Path, role: str,
               *extra: str) -> tuple[OperatorProcess, str]:
    health_port = free_port()
    operator = OperatorProcess(
        [sys.executable, "-m", "pluto", "operator", f"--role={role}",
         "--health-host", "127.0.0.1", "--health-port", str(health_port),
         "--server-url", server.url, "--poll-interval", "0.5", "--log-level", "DEBUG", *extra],
        env=kube.env, log_path=tmp_path / f"{role}.log", cwd=ROOT,
    ).start()

    operator.wait_ready(f"http://127.0.0.1:{health_port}", 30)
    return operator, f"http://127.0.0.1:{health_port}"


@pytest.fixture
def stopped_cleanly() -> Iterator[list[OperatorProcess]]:
    started: list[OperatorProcess] = []
    yield started
    for operator in started:
        assert operator.stop() == 0, operator.logs()
        assert operator.tracebacks() == [], operator.logs()


def plutorun(kube: KubeEmulator, name: str, **spec: Any) -> None:
    kube.create(PLUTORUNS, {"apiVersion": "pluto.dev/v1alpha1", "kind": "PlutoRun",
                            "metadata": {"name": name, "namespace": NS},
                            "spec": {"project": "ops", **spec}}, namespace=NS)


def status_when(kube: KubeEmulator, name: str, predicate: Callable[[dict[str, Any]], bool],
                operator: OperatorProcess) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = kube.get(PLUTORUNS, name, namespace=NS).get("status") or {}
        return status if predicate(status) else None

    found: dict[str, Any] = wait_for(check, 20, message=operator.logs)
    return found


def put_pod(kube: KubeEmulator, name: str, run: str, phase: str, **labels: str) -> None:
    kube.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": NS,
                                    "labels": {"pluto.dev/run": run, **labels},
                                    "annotations": {"pluto.dev/injected": run}},
                       "spec": {"containers": [{"name": "c", "image": "i"}]}}, namespace=NS)
    kube.patch(PODS, name, {"status": {"phase": phase}}, namespace=NS, subresource="status")


def has_run(status: dict[str, Any]) -> bool:
    return status.get("serverRunId") is not None


def test_the_reconciler_is_granted_what_it_uses_and_no_more(
        kube_emulator_factory: Callable[..., KubeEmulator],
        server_factory: Callable[..., ServerProcess], tmp_path: Path,
        stopped_cleanly: list[OperatorProcess]) -> None:
    kube = kube_emulator_factory(crds=[ROOT / "crds" / "plutorun.yaml"],
                                 namespaces=("default", "kube-system", NS))
    server = server_factory()
    operator, _ = start_role(kube, server, tmp_path, "reconciler")
    stopped_cleanly.append(operator)

    # A run through its Job: opened, Running, Succeeded, finished.
    plutorun(kube, "train", selector={"matchLabels": {"batch.kubernetes.io/job-name": "train"}})
    status_when(kube, "train", has_run, operator)
    kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job",
                       "metadata": {"name": "train", "namespace": NS},
                       "spec": {"template": {"spec": {"containers": []}}}}, namespace=NS)
    put_pod(kube, "train-0", "train", "Running", **{"batch.kubernetes.io/job-name": "train"})
    status_when(kube, "train", lambda s: s.get("phase") == "Running", operator)
    kube.patch(JOBS, "train", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}},
               namespace=NS, subresource="status")
    status_when(kube, "train", lambda s: s.get("phase") == "Succeeded", operator)
    # Through its JobSet, failed.
    plutorun(kube, "js", selector={"matchLabels": {"jobset.sigs.k8s.io/jobset-name": "js"}})
    status_when(kube, "js", has_run, operator)
    kube.create(JOBSETS, {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                          "metadata": {"name": "js", "namespace": NS},
                          "spec": {"replicatedJobs": []}}, namespace=NS)
    put_pod(kube, "js-0", "js", "Running", **{"jobset.sigs.k8s.io/jobset-name": "js"})
    status_when(kube, "js", lambda s: s.get("phase") == "Running", operator)
    kube.patch(JOBSETS, "js", {"status": {"conditions": [{"type": "Failed", "status": "True"}]}},
               namespace=NS, subresource="status")
    status_when(kube, "js", lambda s: s.get("phase") == "Failed", operator)
    # Spec changed, a refused fork, a deletion (the finalizer).
    plutorun(kube, "tune", config={"lr": 1})
    status_when(kube, "tune", has_run, operator)
    kube.patch(PLUTORUNS, "tune", {"spec": {"config": {"lr": 2}}}, namespace=NS)
    # (A fork of "train", finished with no step logged: refused for good, with an event.)
    plutorun(kube, "orphan", fork={"runId": "train", "step": 5})
    status_when(kube, "orphan", lambda s: any(c["reason"] == "ServerRefused"
                                              for c in s.get("conditions", [])), operator)
    plutorun(kube, "gone")
    status_when(kube, "gone", has_run, operator)
    kube.delete(PLUTORUNS, "gone", namespace=NS)
    wait_for(lambda: kube.find(PLUTORUNS, "gone", namespace=NS) is None, 15,
             message=operator.logs)
    # A JobSet in an opted-in namespace gets a PlutoRun.
    kube.patch(NAMESPACES, NS, {"metadata": {"labels": {"pluto.dev/inject": "enabled"}}})
    kube.create(JOBSETS, {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                          "metadata": {"name": "auto", "namespace": NS},
                          "spec": {"replicatedJobs": []}}, namespace=NS)
    wait_for(lambda: kube.find(PLUTORUNS, "auto", namespace=NS), 15, message=operator.logs)
    status_when(kube, "auto", has_run, operator)
    wait_for(lambda: any(e.get("reason") == "RunCreated"
                         for e in kube.list_objects(EVENTS, namespace=NS)), 10,
             message=operator.logs)
    assert operator.stop() == 0  # shutting down is part of what it does (finalizers stay)

    check_role("operator", uses_of(kube))


def test_the_webhook_is_granted_what_it_uses_and_no_more(
        kube_emulator_factory: Callable[..., KubeEmulator],
        server_factory: Callable[..., ServerProcess], tmp_path: Path,
        stopped_cleanly: list[OperatorProcess]) -> None:
    kube = kube_emulator_factory(crds=[ROOT / "crds" / "plutorun.yaml"],
                                 namespaces=("default", "kube-system", NS))
    server = server_factory()
    cert = self_signed(["localhost", "127.0.0.1"])
    cert_file, key_file = write_certificate(cert, tmp_path / "tls")
    port = free_port()
    operator, _ = start_role(kube, server, tmp_path, "webhook", "--webhook-host", "127.0.0.1",
                             "--webhook-port", str(port), "--tls-cert-file", str(cert_file),
                             "--tls-key-file", str(key_file))
    stopped_cleanly.append(operator)
    plutorun(kube, "sft")
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "sft", "uid": "job-uid"}
    context = ssl.create_default_context(cadata=cert.ca_pem.decode())
    with httpx.Client(verify=context) as client:
        def answer(env: list[dict[str, str]]) -> dict[str, Any] | None:
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"generateName": "sft-", "labels": {"pluto.dev/run": "sft"},
                                "ownerReferences": [owner]},
                   "spec": {"containers": [{"name": "c", "image": "i", "env": env}]}}
            reply = client.post(f"https://127.0.0.1:{port}/mutate-pods",
                                content=json.dumps(pod_review(pod, NS)).encode()).json()
            return reply if "patch" in reply["response"] else None

        wait_for(lambda: answer([]), 10, message=operator.logs)
        # A pod that keeps its own PLUTO_RUN_ID: a warning, and an event on its Job.
        warned = answer([{"name": "PLUTO_RUN_ID", "value": "other"}])
        assert warned is not None and warned["response"]["warnings"], warned
    wait_for(lambda: any(e.get("reason") == "PlutoInjection"
                         for e in kube.list_objects(EVENTS, namespace=NS)), 10,
             message=operator.logs)
    assert operator.stop() == 0

    check_role("webhook", uses_of(kube))


def check_role(component: str, used: set[Use]) -> None:
    granted = chart_grants(component)
    extras = JUSTIFIED_EXTRAS[component]
    missing = used - granted
    assert not missing, f"the {component} uses what the chart does not grant: {sorted(missing)}"
    unused = granted - used - set(extras)
    assert not unused, (f"the chart grants the {component} what it never used: {sorted(unused)}"
                        f"; used: {sorted(used)}")
    stale = set(extras) - granted
    assert not stale, f"justified extras the chart no longer grants: {sorted(stale)}"
