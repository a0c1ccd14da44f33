"""The real operator (``pluto operator``, kopf) against the Kubernetes emulator and a real server.

kmock's emulator (tests/support/kube_emulator.py) stands in for the API server; it runs no
controllers, so Jobs, JobSets and pods are written by the tests, with the status their
controllers and the kubelet would give them. Everything else is real: the operator process, its
watches and finalizers, its HTTPS webhook with the generated certificate (``--dev``), and a
``pluto server`` process that holds the runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kopf
import pytest
from support.admission import apply_answer, pod_review
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
from support.server_process import ServerProcess, clean_env, create_api_key, revoke_api_key

import pluto
from pluto import query
from pluto.wire import RunAttached, RunStatus
from pluto_operator import conditions as cond
from pluto_operator.names import label_value
from pluto_operator.reconciler import Reconciler
from pluto_operator.settings import OperatorSettings
from pluto_operator.targets import NamespaceInfo
from pluto_operator.tracking import Refused

ROOT = Path(__file__).resolve().parent.parent
NS = "ml"
WEBHOOK_CONFIGS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
MUTATING_CONFIG = "pluto-dev-webhook"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    kube: KubeEmulator
    server: ServerProcess
    operator: OperatorProcess
    webhook_url: str
    health_url: str

    def logs(self) -> str:
        return self.operator.logs()

    def plutorun(self, object_name: str, /, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "pluto.dev/v1alpha1", "kind": "PlutoRun",
                "metadata": {"name": object_name, "namespace": NS},
                "spec": {"project": "ops", **spec}}
        created: dict[str, Any] = self.kube.create(PLUTORUNS, body, namespace=NS)
        return created

    def status_when(self, name: str, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 20) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = (self.kube.get(PLUTORUNS, name, namespace=NS).get("status") or {})
            return status if predicate(status) else None

        found: dict[str, Any] = wait_for(check, timeout, message=self.logs)
        return found

    def events_for(self, name: str) -> list[dict[str, Any]]:
        events = self.kube.list_objects(EVENTS, namespace=NS)
        return [e for e in events if e.get("involvedObject", {}).get("name") == name]


@contextlib.contextmanager
def operator_cluster(kube: KubeEmulator, server: ServerProcess, tmp_path: Path,
                     *extra_args: str) -> Iterator[Cluster]:
    """``pluto operator --dev`` (``extra_args`` added) on ``kube``, with ``server`` as the
    server of PlutoRuns; stopped at the end, where it must exit 0 without a traceback."""
    webhook_port, health_port = free_port(), free_port()
    webhook_url = f"https://127.0.0.1:{webhook_port}"
    operator = OperatorProcess(
        [sys.executable, "-m", "pluto", "operator", "--dev", "--webhook-url", webhook_url,
         "--webhook-host", "127.0.0.1", "--health-host", "127.0.0.1",
         "--health-port", str(health_port), "--server-url", server.url,
         "--poll-interval", "0.5", "--log-level", "DEBUG", *extra_args],
        env=kube.env, log_path=tmp_path / "operator.log", cwd=ROOT,
    ).start()
    cluster = Cluster(kube, server, operator, webhook_url,
                      f"http://127.0.0.1:{health_port}")

    operator.wait_ready(cluster.health_url, 30)
    try:
        yield cluster
    finally:
        code = operator.stop()
        assert code == 0, operator.logs()
        assert operator.tracebacks() == [], operator.logs()


def emulated_cluster(kube_emulator_factory: Callable[..., KubeEmulator]) -> KubeEmulator:
    return kube_emulator_factory(crds=[ROOT / "crds" / "plutorun.yaml"],
                                 namespaces=("default", "kube-system", NS))


@pytest.fixture
def cluster(kube_emulator_factory: Callable[..., KubeEmulator],
            server_factory: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Cluster]:
    with operator_cluster(emulated_cluster(kube_emulator_factory), server_factory(),
                          tmp_path) as cluster:
        yield cluster


def test_start_up_objects_are_frozen_out_of_the_collector_once_caches_are_warm(
        cluster: Cluster) -> None:
    """A full garbage collection walking kopf, the API client and the caches took ~100 ms,
    in the middle of admissions; they are frozen once, when the caches are warm."""
    frozen = re.findall(r"start-up objects frozen out of the garbage collector's walks: "
                        r"(\d+)", cluster.operator.logs())
    assert len(frozen) == 1 and int(frozen[0]) > 10_000, cluster.operator.logs()


def test_dev_mode_manages_its_webhook_configuration(cluster: Cluster) -> None:
    config = cluster.kube.get(WEBHOOK_CONFIGS, MUTATING_CONFIG)
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["url"] == cluster.webhook_url + "/mutate-pods"
    assert hook["timeoutSeconds"] <= 10 and hook["failurePolicy"] == "Ignore"
    assert hook["rules"][0]["resources"] == ["pods"]
    assert hook["rules"][0]["operations"] == ["CREATE"]
    # The operator's certificate verifies against the caBundle it published.
    ca = base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
    context = ssl.create_default_context(cadata=ca)
    with httpx.Client(verify=context) as client:
        response = client.post(hook["clientConfig"]["url"], content=b"{}")
    assert response.status_code == 200
    # SIGTERM: the configuration is removed with the process that served it.
    assert cluster.operator.stop() == 0
    assert cluster.kube.find(WEBHOOK_CONFIGS, MUTATING_CONFIG) is None


def test_create_opens_the_run_and_records_it(cluster: Cluster) -> None:
    cluster.plutorun("sft", name="SFT baseline", config={"lr": 3e-4, "model": {"rank": 16}},
                     tags=["sft"])
    status = cluster.status_when("sft", lambda s: s.get("serverRunId") is not None)
    assert status["runId"] == "sft" and status["phase"] == "Pending"
    assert status["displayId"].endswith("-1")
    ready = {c["type"]: c for c in status["conditions"]}
    assert ready["RunReady"]["status"] == "True" and ready["RunReady"]["reason"] == "RunCreated"
    assert ready["ServerReachable"]["status"] == "True"
    run = query.get_run(status["serverRunId"], url=cluster.server.url)
    assert (run.project, run.run_id, run.name) == ("ops", "sft", "SFT baseline")
    assert run.config == {"lr": 3e-4, "model": {"rank": 16}} and run.tags == ["sft"]
    reasons = wait_for(lambda: {e["reason"] for e in cluster.events_for("sft")} or None, 10)
    assert "RunCreated" in reasons
    # The finalizer that makes deletion finish the run first.
    meta = cluster.kube.get(PLUTORUNS, "sft", namespace=NS)["metadata"]
    assert "pluto.dev/finish-run" in meta["finalizers"]


def test_the_operators_key_file_is_followed_from_before_it_exists_through_a_rotation(
        kube_emulator_factory: Callable[..., KubeEmulator],
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """The chart mounts the operator's key Secret as an optional file. Created after the
    operator started, the key is used without a restart (PlutoRuns refused meanwhile, for
    no key or for a key limited to another project, are retried, not given up on); rotated,
    the new key is used and the old one may be revoked."""
    server = server_factory(start=False, extra_args=["--auth"])
    first, second = (create_api_key(server.data_dir, name) for name in ("first", "second"))
    elsewhere = create_api_key(server.data_dir, "elsewhere", "--project", "theirs")
    server.start()
    key_file = tmp_path / "secret" / "api-key"
    with operator_cluster(emulated_cluster(kube_emulator_factory), server, tmp_path,
                          "--api-key-file", str(key_file), "--api-key-optional") as cluster:
        cluster.plutorun("early")

        def run_ready(status: dict[str, Any]) -> dict[str, Any]:
            found = [c for c in status.get("conditions") or [] if c["type"] == cond.RUN_READY]
            return found[0] if found else {}

        refused = cluster.status_when(
            "early", lambda s: run_ready(s).get("reason") == "ApiKeyRefused")
        assert "serverRunId" not in refused
        assert cond.condition_status(refused["conditions"], cond.SERVER_REACHABLE) == "True"
        key_file.parent.mkdir()
        # A key limited to another project: refused too (403), and retried the same way.
        key_file.write_text(elsewhere)
        # (Retries back off 1, 2, 4, 8, 16 s, so the next one may be 16 s away.)
        cluster.status_when(
            "early", lambda s: "limited to project" in run_ready(s).get("message", ""),
            timeout=40)
        staged = key_file.with_name("staged")
        staged.write_text(first + "\n")
        staged.replace(key_file)
        opened = cluster.status_when("early", lambda s: s.get("serverRunId") is not None,
                                     timeout=40)
        assert run_ready(opened)["reason"] == "RunCreated"
        # Rotation as the kubelet does it: a new file swapped in, then the old key revoked.
        staged.write_text(second)
        staged.replace(key_file)
        revoke_api_key(server.data_dir, first)
        cluster.plutorun("later")
        status = cluster.status_when("later", lambda s: s.get("serverRunId") is not None)
        run = query.get_run(status["serverRunId"], url=server.url, api_key=second)
        assert (run.project, run.run_id) == ("ops", "later")
        assert "API key read again from its file: it changed" in cluster.logs()
        assert all(key not in cluster.logs() for key in (first, second, elsewhere))


def test_fork_happens_once_on_the_server_and_is_resolved(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    cluster.plutorun("base", config={"lr": 1e-3, "batch": 64}, tags=["base"])
    base = cluster.status_when("base", lambda s: s.get("serverRunId") is not None)
    # The training logs into the base run (a fork needs steps to fork from).
    run = pluto.init(project="ops", run_id="base", dir=tmp_path / "sdk",
                     settings={"url": cluster.server.url, "sidecar_socket": None})
    for step in range(200):
        run.log({"loss": 1 / (step + 1)}, step=step)
    run.finish()
    cluster.plutorun("lr-sweep", runId="lr-1e-4", config={"lr": 1e-4},
                     fork={"runId": "base", "step": 100, "inheritTags": True})
    fork = cluster.status_when("lr-sweep", lambda s: s.get("serverRunId") is not None)
    assert fork["forkedFrom"] == base["serverRunId"] and fork["forkStep"] == 100
    assert fork["runId"] == "lr-1e-4"
    forked = query.get_run(fork["serverRunId"], url=cluster.server.url)
    assert forked.forked_from == base["serverRunId"]
    assert forked.config == {"lr": 1e-4, "batch": 64}  # inherited, then ours merged over it
    assert set(forked.tags) == {"base"}
    assert {c["reason"] for c in fork["conditions"]} >= {"RunForked"}


def test_a_fork_waits_for_its_parent_and_is_made_once_the_parent_has_the_step(
        cluster: Cluster, tmp_path: Path) -> None:
    """Applied together (one file), a fork comes before its parent has run: it waits, as a
    pod waits for a ConfigMap it names, and is made once the parent has logged the step."""
    cluster.plutorun("sweep", runId="sweep-1", fork={"runId": "later-base", "step": 50})

    def waiting(text: str) -> Callable[[dict[str, Any]], bool]:
        return lambda s: any(c["type"] == "RunReady" and c["reason"] == "WaitingForForkParent"
                             and text in c["message"] for c in s.get("conditions", []))

    status = cluster.status_when("sweep", waiting("'later-base' does not exist"))
    assert "serverRunId" not in status and status["phase"] == "Pending"
    parent = pluto.init(project="ops", run_id="later-base", dir=tmp_path / "sdk",
                        settings={"url": cluster.server.url, "sidecar_socket": None})

    def server_has_up_to(step: int) -> None:
        wait_for(lambda: query.get_run(parent.id, url=cluster.server.url).last_step == step,
                 20, message=cluster.logs)

    for step in range(20):
        parent.log({"loss": 1.0}, step=step)
    server_has_up_to(19)
    cluster.status_when("sweep", waiting("has logged up to step 19, not step 50 yet"), 30)
    for step in range(20, 60):
        parent.log({"loss": 1.0}, step=step)
    server_has_up_to(59)
    fork = cluster.status_when("sweep", lambda s: s.get("serverRunId") is not None, 60)
    assert fork["forkedFrom"] == parent.id and fork["forkStep"] == 50
    parent.finish()
    assert not any(e["reason"] == "ServerRefused" for e in cluster.events_for("sweep"))


def test_a_fork_past_the_last_step_of_a_finished_parent_is_refused_for_good(
        cluster: Cluster, tmp_path: Path) -> None:
    finished = pluto.init(project="ops", run_id="short-base", dir=tmp_path / "sdk",
                          settings={"url": cluster.server.url, "sidecar_socket": None})
    for step in range(10):
        finished.log({"loss": 1.0}, step=step)
    finished.finish()
    cluster.plutorun("too-far", fork={"runId": "short-base", "step": 50})
    status = cluster.status_when(
        "too-far", lambda s: any(c["type"] == "RunReady" and c["status"] == "False"
                                 for c in s.get("conditions", [])))
    ready = next(c for c in status["conditions"] if c["type"] == "RunReady")
    assert ready["reason"] == "ServerRefused"
    assert "outside the steps logged" in ready["message"] and "0-9" in ready["message"]
    assert "serverRunId" not in status


def test_unreachable_server_is_a_condition_and_retried(cluster: Cluster) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    cluster.plutorun("offline", server={"url": closed})
    status = cluster.status_when(
        "offline", lambda s: any(c["type"] == "ServerReachable" and c["status"] == "False"
                                 for c in s.get("conditions", [])))
    reach = next(c for c in status["conditions"] if c["type"] == "ServerReachable")
    assert reach["reason"] == "ServerUnreachable" and closed in reach["message"]
    assert status["phase"] == "Pending"


def pod(name: str, run: str, phase: str, *, job: str | None = None,
        jobset: str | None = None) -> dict[str, Any]:
    labels = {"pluto.dev/run": run}
    if job:
        labels["batch.kubernetes.io/job-name"] = job
    if jobset:
        labels["jobset.sigs.k8s.io/jobset-name"] = jobset
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels,
                         "annotations": {"pluto.dev/injected": run}},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": phase}}


def put_pod(kube: KubeEmulator, body: dict[str, Any]) -> None:
    status = body.pop("status")
    kube.create(PODS, body, namespace=NS)
    kube.patch(PODS, body["metadata"]["name"], {"status": status}, namespace=NS,
               subresource="status")


def test_phase_follows_the_job_and_the_run_is_finished(cluster: Cluster) -> None:
    cluster.plutorun("train", selector={"matchLabels": {"batch.kubernetes.io/job-name": "train"}})
    status = cluster.status_when("train", lambda s: s.get("serverRunId") is not None)
    cluster.kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job",
                               "metadata": {"name": "train", "namespace": NS},
                               "spec": {"template": {"spec": {"containers": []}}}},
                        namespace=NS)
    put_pod(cluster.kube, pod("train-0", "train", "Running", job="train"))
    put_pod(cluster.kube, pod("train-1", "train", "Pending", job="train"))
    running = cluster.status_when("train", lambda s: s.get("phase") == "Running")
    assert running["podsInjected"] == 2
    cluster.kube.patch(JOBS, "train", {"status": {"conditions": [
        {"type": "Complete", "status": "True"}]}}, namespace=NS, subresource="status")
    done = cluster.status_when(
        "train", lambda s: s.get("phase") == "Succeeded" and any(
            c["type"] == "RunFinished" and c["status"] == "True"
            for c in s.get("conditions", [])))
    assert done["podsInjected"] == 2
    run = query.get_run(status["serverRunId"], url=cluster.server.url)
    assert run.status is RunStatus.COMPLETED


def test_failed_jobset_fails_the_run(cluster: Cluster) -> None:
    cluster.plutorun("js", selector={"matchLabels": {"jobset.sigs.k8s.io/jobset-name": "js"}})
    status = cluster.status_when("js", lambda s: s.get("serverRunId") is not None)
    cluster.kube.create(JOBSETS, {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                                  "metadata": {"name": "js", "namespace": NS},
                                  "spec": {"replicatedJobs": []}}, namespace=NS)
    put_pod(cluster.kube, pod("js-0", "js", "Running", jobset="js"))
    cluster.status_when("js", lambda s: s.get("phase") == "Running")
    cluster.kube.patch(JOBSETS, "js", {"status": {"conditions": [
        {"type": "Failed", "status": "True"}]}}, namespace=NS, subresource="status")
    cluster.status_when("js", lambda s: s.get("phase") == "Failed")
    wait_for(lambda: query.get_run(status["serverRunId"], url=cluster.server.url).status
             is RunStatus.FAILED, 10, message=cluster.logs)


def test_delete_finishes_the_run_then_lets_go(cluster: Cluster) -> None:
    cluster.plutorun("gone")
    status = cluster.status_when("gone", lambda s: s.get("serverRunId") is not None)
    cluster.kube.delete(PLUTORUNS, "gone", namespace=NS)
    wait_for(lambda: cluster.kube.find(PLUTORUNS, "gone", namespace=NS) is None, 15,
             message=cluster.logs)
    run = query.get_run(status["serverRunId"], url=cluster.server.url)
    assert run.status is RunStatus.TERMINATED  # deleted while not finished


def finish_on_the_server(cluster: Cluster, run_id: int, status: RunStatus) -> None:
    """What the ranks' ``finish()`` does."""
    answer = httpx.post(f"{cluster.server.url}/api/v1/runs/{run_id}/finish",
                        json={"status": status.value})
    assert answer.status_code == 200, answer.text


def test_a_workload_gone_between_looks_takes_its_phase_from_the_run(cluster: Cluster) -> None:
    """A Job with a TTL (or deleted right after it ended) and its pods vanish before the
    operator saw its outcome: the phase is the run's status that its ranks' finish() left,
    not Running for ever; and deleting the PlutoRun then does not make it TERMINATED."""
    cluster.plutorun("ttl", selector={"matchLabels": {"batch.kubernetes.io/job-name": "ttl"}})
    status = cluster.status_when("ttl", lambda s: s.get("serverRunId") is not None)
    cluster.kube.create(JOBS, {"apiVersion": "batch/v1", "kind": "Job",
                               "metadata": {"name": "ttl", "namespace": NS},
                               "spec": {"template": {"spec": {"containers": []}}}},
                        namespace=NS)
    put_pod(cluster.kube, pod("ttl-0", "ttl", "Running", job="ttl"))
    cluster.status_when("ttl", lambda s: s.get("phase") == "Running")
    finish_on_the_server(cluster, status["serverRunId"], RunStatus.COMPLETED)
    cluster.kube.delete(PODS, "ttl-0", namespace=NS)
    cluster.kube.delete(JOBS, "ttl", namespace=NS)
    cluster.status_when("ttl", lambda s: s.get("phase") == "Succeeded")
    cluster.kube.delete(PLUTORUNS, "ttl", namespace=NS)
    wait_for(lambda: cluster.kube.find(PLUTORUNS, "ttl", namespace=NS) is None, 15,
             message=cluster.logs)
    assert query.get_run(status["serverRunId"], url=cluster.server.url).status \
        is RunStatus.COMPLETED


def test_deleting_a_plutorun_whose_ranks_finished_the_run_keeps_their_status(
        cluster: Cluster) -> None:
    cluster.plutorun("done")
    status = cluster.status_when("done", lambda s: s.get("serverRunId") is not None)
    finish_on_the_server(cluster, status["serverRunId"], RunStatus.COMPLETED)
    cluster.kube.delete(PLUTORUNS, "done", namespace=NS)
    wait_for(lambda: cluster.kube.find(PLUTORUNS, "done", namespace=NS) is None, 15,
             message=cluster.logs)
    assert query.get_run(status["serverRunId"], url=cluster.server.url).status \
        is RunStatus.COMPLETED  # was TERMINATED: it outranks COMPLETED


def test_spec_changes_reach_the_run(cluster: Cluster) -> None:
    cluster.plutorun("tune", config={"lr": 1}, tags=["a", "b"])
    status = cluster.status_when("tune", lambda s: s.get("serverRunId") is not None)
    cluster.kube.patch(PLUTORUNS, "tune", {"spec": {"config": {"lr": 2, "wd": 0.1},
                                                    "tags": ["b", "c"]}}, namespace=NS)

    def updated() -> bool:
        run = query.get_run(status["serverRunId"], url=cluster.server.url)
        return run.config == {"lr": 2, "wd": 0.1} and sorted(run.tags) == ["b", "c"]

    wait_for(updated, 15, message=cluster.logs)
    cluster.kube.patch(PLUTORUNS, "tune", {"spec": {"project": "elsewhere"}}, namespace=NS)
    wait_for(lambda: "ImmutableField" in {e["reason"] for e in cluster.events_for("tune")}, 10,
             message=cluster.logs)


def test_jobset_in_an_opted_in_namespace_gets_a_plutorun(cluster: Cluster) -> None:
    cluster.kube.patch(NAMESPACES, NS, {"metadata": {
        "labels": {"pluto.dev/inject": "enabled"},
        "annotations": {"pluto.dev/project": "konduktor"}}})
    jobset = cluster.kube.create(JOBSETS, {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": "llama-sft-3f9a", "namespace": NS, "labels": {"parent": "trainy"}},
        "spec": {"replicatedJobs": []}}, namespace=NS)
    created = wait_for(lambda: cluster.kube.find(PLUTORUNS, "llama-sft-3f9a", namespace=NS),
                       15, message=cluster.logs)
    assert created["spec"]["runId"] == "llama-sft-3f9a"
    assert created["spec"]["project"] == "konduktor"
    (owner,) = created["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("JobSet", jobset["metadata"]["uid"])
    status = cluster.status_when("llama-sft-3f9a", lambda s: s.get("serverRunId") is not None)
    run = query.get_run(status["serverRunId"], url=cluster.server.url)
    assert (run.project, run.run_id) == ("konduktor", "llama-sft-3f9a")


def test_webhook_answers_from_its_warm_cache(cluster: Cluster) -> None:
    """A PlutoRun created through the API is in the webhook's cache within moments: a pod
    labelled for it is injected, with the server URL and project from the PlutoRun."""
    cluster.plutorun("cached", server={"url": cluster.server.url})
    config = cluster.kube.get(WEBHOOK_CONFIGS, MUTATING_CONFIG)
    ca = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]).decode()
    labelled = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "x-", "labels": {"pluto.dev/run": "cached"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]}}
    with httpx.Client(verify=ssl.create_default_context(cadata=ca)) as client:
        def injected() -> dict[str, Any] | None:
            answer = client.post(cluster.webhook_url + "/mutate-pods",
                                 content=json.dumps(pod_review(labelled, NS)).encode()).json()
            return answer if "patch" in answer["response"] else None

        answer = wait_for(injected, 10, message=cluster.logs)
    mutated = apply_answer(labelled, answer)
    sidecar = mutated["spec"]["initContainers"][0]  # emulator says v1.31: native sidecars
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["PLUTO_URL"] == cluster.server.url
    assert mutated["spec"]["containers"][0]["env"][1] == {"name": "PLUTO_PROJECT",
                                                          "value": "ops"}


def test_old_cluster_gets_classic_sidecars(
        kube_emulator_factory: Callable[..., KubeEmulator], tmp_path: Path) -> None:
    kube = kube_emulator_factory(git_version="v1.28.4", namespaces=("default", NS))
    webhook_port, health_port = free_port(), free_port()
    operator = OperatorProcess(
        [sys.executable, "-m", "pluto", "operator", "--role", "webhook", "--dev", "--webhook-url",
         f"https://127.0.0.1:{webhook_port}", "--webhook-host", "127.0.0.1",
         "--health-host", "127.0.0.1", "--health-port", str(health_port)],
        env=kube.env, log_path=tmp_path / "operator.log", cwd=ROOT).start()
    try:
        wait_for(lambda: "Kubernetes 1.28: classic sidecars" in operator.logs(), 30,
                 message=operator.logs)
    finally:
        assert operator.stop() == 0


def test_a_refused_plutorun_is_opened_once_its_spec_is_fixed(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    finished = pluto.init(project="ops", run_id="ended-parent", dir=tmp_path / "sdk",
                          settings={"url": cluster.server.url, "sidecar_socket": None})
    finished.log({"loss": 1.0}, step=0)
    finished.finish()
    cluster.plutorun("fixme", fork={"runId": "ended-parent", "step": 5})
    cluster.status_when("fixme", lambda s: any(
        c["reason"] == "ServerRefused" for c in s.get("conditions", [])))
    # The user drops the fork: the operator tries again with the new spec.
    cluster.kube.patch(PLUTORUNS, "fixme", [{"op": "remove", "path": "/spec/fork"}],
                       namespace=NS, patch_type="json")
    status = cluster.status_when("fixme", lambda s: s.get("serverRunId") is not None)
    ready = next(c for c in status["conditions"] if c["type"] == "RunReady")
    assert (ready["status"], ready["reason"]) == ("True", "RunCreated")


def test_fork_lost_to_a_rank_that_opened_the_run_first_is_not_reported_ready(
        cluster: Cluster, tmp_path: Path) -> None:
    """The race of the webhook injecting before the reconciler forked: a rank's pluto.init()
    created the run unforked. The operator must not call that a success."""
    cluster.plutorun("base")
    cluster.status_when("base", lambda s: s.get("serverRunId") is not None)
    run = pluto.init(project="ops", run_id="base", dir=tmp_path / "sdk",
                     settings={"url": cluster.server.url, "sidecar_socket": None})
    for step in range(20):
        run.log({"loss": 1 / (step + 1)}, step=step)
    run.finish()
    # The rank got there first, without a fork (an SDK that does not read PLUTO_FORK_*).
    early = pluto.init(project="ops", run_id="lr-1e-3", dir=tmp_path / "rank",
                       settings={"url": cluster.server.url, "sidecar_socket": None})
    early.finish()
    cluster.plutorun("lr-sweep", runId="lr-1e-3", fork={"runId": "base", "step": 10})
    status = cluster.status_when("lr-sweep", lambda s: any(
        c["type"] == "RunReady" for c in s.get("conditions", [])))
    ready = next(c for c in status["conditions"] if c["type"] == "RunReady")
    assert (ready["status"], ready["reason"]) == ("False", "ForkMismatch"), ready
    assert "'base' at step 10" in ready["message"] and "spec.runId" in ready["message"]
    assert "serverRunId" not in status and "forkedFrom" not in status
    reasons = wait_for(lambda: {e["reason"] for e in cluster.events_for("lr-sweep")} or None, 10)
    assert "ForkMismatch" in reasons


# -- the reconciler's handlers, called directly ---------------------------------------------------


class FakeServers:
    """The tracking server as the reconciler sees it: one canned answer per call."""

    def __init__(self, answer: RunAttached | Exception, owner: int = 7) -> None:
        self.answer = answer
        self.owner = owner
        self.owner_asked: list[tuple[str, str, int]] = []

    def open_run(self, url: str, spec: Any, run_id: str) -> RunAttached:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def fork_owner(self, url: str, project: str, ref: str, step: int) -> int:
        self.owner_asked.append((project, ref, step))
        return self.owner


class FakeKube:
    def __init__(self) -> None:
        self.selectors: list[str] = []
        self.created: list[dict[str, Any]] = []

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self.selectors.append(label_selector)
        return []

    def create_plutorun(self, namespace: str, body: dict[str, Any]) -> bool:
        self.created.append(body)
        return True


def attached(**fields: Any) -> RunAttached:
    values: dict[str, Any] = dict(
        id=12, project="ops", display_id="OPS-12", run_id="lr-1e-4", name="lr-1e-4",
        config={}, tags=[], status=RunStatus.RUNNING, created_at=0.0, updated_at=0.0,
        resumed=True)
    values.update(fields)
    return RunAttached(**values)


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Events the handlers post, as (reason, message), instead of kopf's event queue."""
    events: list[tuple[str, str]] = []

    def record(body: Any, *, reason: str, message: str = "", **_: Any) -> None:
        events.append((reason, message))

    monkeypatch.setattr(kopf, "warn", record)
    monkeypatch.setattr(kopf, "event", record)
    return events


def open_fork(servers: FakeServers) -> tuple[kopf.Patch, BaseException | None]:
    raw: dict[str, Any] = {"apiVersion": "pluto.dev/v1alpha1", "kind": "PlutoRun",
                           "metadata": {"name": "lr-sweep", "namespace": NS, "generation": 1},
                           "spec": {"project": "ops", "runId": "lr-1e-4",
                                    "fork": {"runId": "base", "step": 100}}}
    body = kopf.Body(raw)  # type: ignore[arg-type]
    reconciler = Reconciler(OperatorSettings(), FakeKube(), servers)  # type: ignore[arg-type]
    patch = kopf.Patch()
    try:
        reconciler.open_run(body=body, status=body.status, patch=patch, retry=0)
    except (kopf.PermanentError, kopf.TemporaryError) as exc:
        return patch, exc
    return patch, None


def run_ready(patch: kopf.Patch) -> dict[str, Any]:
    found: dict[str, Any] = next(
        c for c in patch["status"]["conditions"] if c["type"] == "RunReady")
    return found


def test_attach_to_a_run_without_the_requested_fork_is_a_fork_mismatch(
        posted: list[tuple[str, str]]) -> None:
    patch, error = open_fork(FakeServers(attached(forked_from=None, fork_step=None)))
    assert isinstance(error, kopf.PermanentError)
    ready = run_ready(patch)
    assert (ready["status"], ready["reason"]) == ("False", "ForkMismatch")
    assert "no fork" in ready["message"] and "'base' at step 100" in ready["message"]
    assert "serverRunId" not in patch["status"]
    assert [reason for reason, _ in posted] == ["ForkMismatch"]


def test_attach_to_a_fork_at_another_step_is_a_fork_mismatch(
        posted: list[tuple[str, str]]) -> None:
    patch, error = open_fork(FakeServers(attached(forked_from=7, fork_step=50,
                                                  forked_from_display_id="OPS-7")))
    assert isinstance(error, kopf.PermanentError)
    assert run_ready(patch)["reason"] == "ForkMismatch"
    assert "OPS-7 at step 50" in run_ready(patch)["message"]


def test_attach_to_a_fork_of_another_parent_is_a_fork_mismatch(
        posted: list[tuple[str, str]]) -> None:
    servers = FakeServers(attached(forked_from=9, fork_step=100), owner=7)
    patch, error = open_fork(servers)
    assert isinstance(error, kopf.PermanentError)
    assert run_ready(patch)["reason"] == "ForkMismatch"
    assert servers.owner_asked == [("ops", "base", 100)]


def test_attach_to_the_requested_fork_is_ready(posted: list[tuple[str, str]]) -> None:
    """A rank that forked it itself (PLUTO_FORK_*): the server's parent is the owner of the
    step, which the reconciler asks the server for rather than assuming it is spec.fork.runId."""
    servers = FakeServers(attached(forked_from=7, fork_step=100), owner=7)
    patch, error = open_fork(servers)
    assert error is None
    ready = run_ready(patch)
    assert (ready["status"], ready["reason"]) == ("True", "RunAttached")
    assert patch["status"]["serverRunId"] == 12 and patch["status"]["forkedFrom"] == 7
    assert patch["status"]["project"] == "ops"


def test_server_conflict_on_the_fork_is_a_fork_mismatch(posted: list[tuple[str, str]]) -> None:
    conflict = Refused("run 'lr-1e-4' (OPS-12) exists already and is not a fork (HTTP 409)", 409)
    patch, error = open_fork(FakeServers(conflict))
    assert isinstance(error, kopf.PermanentError)
    ready = run_ready(patch)
    assert (ready["status"], ready["reason"]) == ("False", "ForkMismatch")
    assert "is not a fork" in ready["message"] and "spec.runId" in ready["message"]


def test_a_created_fork_needs_no_lineage_lookup(posted: list[tuple[str, str]]) -> None:
    servers = FakeServers(attached(resumed=False, forked_from=7, fork_step=100))
    patch, error = open_fork(servers)
    assert error is None and run_ready(patch)["reason"] == "RunForked"
    assert servers.owner_asked == []


def test_pods_of_a_long_named_plutorun_are_listed_by_its_label_value(
        posted: list[tuple[str, str]]) -> None:
    kube = FakeKube()
    name = "llama-3-70b-sft-cosine-warmup2000-bs512-seq8192-lr3e-4-sweep-run-03"
    reconciler = Reconciler(OperatorSettings(), kube, FakeServers(attached()))  # type: ignore[arg-type]
    body = kopf.Body({"metadata": {"name": name, "namespace": NS}, "spec": {"project": "ops"}})
    reconciler.observe(body=body, name=name, namespace=NS, status=body.status,
                       patch=kopf.Patch())
    assert kube.selectors == [f"pluto.dev/run={label_value(name)}"]
    assert len(label_value(name)) <= 63


def test_jobset_in_a_namespace_with_an_invalid_project_annotation(
        posted: list[tuple[str, str]]) -> None:
    kube = FakeKube()
    reconciler = Reconciler(OperatorSettings(), kube, FakeServers(attached()))  # type: ignore[arg-type]
    info = NamespaceInfo({"pluto.dev/inject": "enabled"}, {"pluto.dev/project": "LLaMA ft"})
    body = kopf.Body({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                      "metadata": {"name": "js", "namespace": NS, "uid": "u1"}})
    reconciler.jobset_created(body=body, name="js", namespace=NS, meta=body.meta,
                              index_namespaces={NS: [info]})
    [created] = kube.created
    assert created["spec"]["project"] == NS  # as if the annotation were absent
    [(reason, message)] = [e for e in posted if e[0] != "PlutoRunCreated"]
    assert reason == "InvalidProjectAnnotation" and "LLaMA ft" in message


@pytest.mark.parametrize(("flags", "says"), [
    (["--api-key-file", "{tmp}/no-such-key"], "--api-key-file {tmp}/no-such-key: cannot read"),
    (["--api-key-optional"], "--api-key-optional says what to do"),
])
def test_a_key_file_flag_that_cannot_work_is_a_one_line_error(
        flags: list[str], says: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pluto", "operator", "--health-port", "0",
         *(f.format(tmp=tmp_path) for f in flags)],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and says.format(tmp=tmp_path) in line, line
