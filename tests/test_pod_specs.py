"""The pods of ``support.pod_specs`` are the pods a cluster would hand the webhook.

What these tests pin, so that webhook tests built on these pods test against reality:

- every pod is a valid ``v1`` Pod for Kubernetes 1.28 to 1.33 (kubernetes-validate, strict);
- the Konduktor pod comes from Konduktor's installed templates and carries what ARCHITECTURE.md
  says Konduktor pods carry: ``jobset.sigs.k8s.io/jobset-name``, ``parent: trainy``,
  ``PLUTO_RUN_ID`` = the job (JobSet) name, ``RANK`` from the completion index,
  ``MASTER_ADDR`` = the DNS name of node 0, ``NUM_NODES``, ``NUM_GPUS_PER_NODE``; and not the
  task's ``resources.labels``;
- the Job, JobSet and training-operator pods carry the labels, annotations, env, names and
  owners their controllers write, and the API server's defaults and admission additions;
- nothing random: building a pod twice gives the same pod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from support import pod_specs
from support.pod_specs import canonical_quantity, env_of

KUBERNETES_VERSIONS = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]
INDEX = "batch.kubernetes.io/job-completion-index"

BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "konduktor-rank0": lambda: pod_specs.konduktor_pod(rank=0),
    "konduktor-rank1": lambda: pod_specs.konduktor_pod(rank=1),
    "konduktor-cpu": lambda: pod_specs.konduktor_pod(resources={"accelerators": None}),
    "jobset-0": lambda: pod_specs.jobset_pod(0),
    "jobset-1": lambda: pod_specs.jobset_pod(1),
    "indexed-job-0": lambda: pod_specs.indexed_job_pod(0),
    "indexed-job-1": lambda: pod_specs.indexed_job_pod(1),
    "pytorchjob-master": lambda: pod_specs.pytorchjob_pod("master", 0),
    "pytorchjob-worker": lambda: pod_specs.pytorchjob_pod("worker", 0),
    "with-run-id": lambda: pod_specs.pod_with_run_id(),
    "plain": lambda: pod_specs.plain_pod(),
}


def k8s_errors(obj: dict[str, Any], version: str) -> list[str]:
    try:
        validated = kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(str(p) for p in error.path) or '<root>'}: {error.message}"]
    assert validated == version
    return []


# -- valid pods, deterministic ------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pods_are_valid(name: str, version: str) -> None:
    pod = BUILDERS[name]()
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    assert k8s_errors(pod, version) == []


def test_validation_would_catch_a_broken_pod() -> None:
    pod = pod_specs.konduktor_pod()
    pod["spec"]["containers"][0]["env"][0]["valueFrom"] = "PYTHONUNBUFFERED"
    assert k8s_errors(pod, "1.33") == [
        "spec.containers.0.env.0.valueFrom: 'PYTHONUNBUFFERED' is not of type 'object', 'null'"
    ]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pods_are_deterministic(name: str) -> None:
    assert BUILDERS[name]() == BUILDERS[name]()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_api_server_admission_happened(name: str) -> None:
    pod = BUILDERS[name]()
    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == "ml"
    assert spec["serviceAccountName"] == spec["serviceAccount"] == "default"
    (token,) = [v for v in spec["volumes"] if v["name"].startswith("kube-api-access-")]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        assert {"name": token["name"], "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"} in container[
            "volumeMounts"]
        assert container["terminationMessagePolicy"] == "File"
        assert container["imagePullPolicy"] == "IfNotPresent"  # every image here has a tag
    assert (spec["priority"], spec["preemptionPolicy"]) == (0, "PreemptLowerPriority")
    assert {t["key"] for t in spec["tolerations"] if t.get("tolerationSeconds") == 300} == {
        "node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable",
    }
    assert (spec["dnsPolicy"], spec["schedulerName"]) == ("ClusterFirst", "default-scheduler")


# -- Konduktor ------------------------------------------------------------------------------------


def test_konduktor_pod_is_rendered_by_konduktor_templates() -> None:
    pod = pod_specs.konduktor_pod()
    (container,) = pod["spec"]["containers"]
    # pod.yaml.j2: the container name, the bash wrapper, and the task's run inside it.
    assert container["name"] == "konduktor-container"
    assert container["command"] == ["bash", "-c"]
    run = pod_specs.konduktor_task()["run"].strip()
    assert run in container["args"][0]
    assert "===== KONDUKTOR: Running task =====" in container["args"][0]
    assert "{{" not in container["args"][0] and "{%" not in container["args"][0]
    # The template itself sets PLUTO_RUN_ID, unless the task's envs do.
    assert "{% if 'PLUTO_RUN_ID' not in env_vars %}" in pod_specs.konduktor_template("pod.yaml.j2")


def test_konduktor_pod_has_jobset_and_konduktor_labels() -> None:
    pod = pod_specs.konduktor_pod(task_name="llama-sft", num_nodes=4, rank=2, suffix="b7c1")
    labels = pod["metadata"]["labels"]
    assert labels["jobset.sigs.k8s.io/jobset-name"] == "llama-sft-b7c1"
    assert labels["parent"] == "trainy"
    assert labels["jobset.sigs.k8s.io/replicatedjob-name"] == "workers"
    assert labels[INDEX] == pod["metadata"]["annotations"][INDEX] == "2"
    assert labels["batch.kubernetes.io/job-name"] == "llama-sft-b7c1-workers-0"
    assert pod["metadata"]["generateName"] == "llama-sft-b7c1-workers-0-2-"
    assert "name" not in pod["metadata"]  # generated by the API server after admission
    (owner,) = pod["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "Job", "llama-sft-b7c1-workers-0", True
    )


def test_konduktor_pod_env() -> None:
    pod = pod_specs.konduktor_pod(task_name="llama-sft", num_nodes=4, rank=2, suffix="b7c1")
    env = env_of(pod)
    # Konduktor's template sets the run id to the job name (task name + suffix).
    assert env["PLUTO_RUN_ID"] == "llama-sft-b7c1"
    assert env["PLUTO_RUN_ID"] == pod["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"]
    assert env["NUM_NODES"] == "4"
    assert env["NUM_GPUS_PER_NODE"] == "8"  # accelerators: H100:8 in the example task
    # RANK is the node's completion index, read by the kubelet from the annotation.
    assert env["RANK"] == {"fieldRef": {"apiVersion": "v1", "fieldPath":
                                        f"metadata.annotations['{INDEX}']"}}
    assert pod["metadata"]["annotations"][INDEX] == "2"
    # MASTER_ADDR is node 0's DNS name: its hostname under the JobSet's headless Service.
    node0 = pod_specs.konduktor_pod(task_name="llama-sft", num_nodes=4, rank=0, suffix="b7c1")
    assert env["MASTER_ADDR"] == f"{node0['spec']['hostname']}.{node0['spec']['subdomain']}"
    assert env["MASTER_ADDR"] == "llama-sft-b7c1-workers-0-0.llama-sft-b7c1"
    names = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))


def test_konduktor_cpu_task_has_no_gpus() -> None:
    pod = pod_specs.konduktor_pod(resources={"accelerators": None})
    assert env_of(pod)["NUM_GPUS_PER_NODE"] == "0"
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"]
    assert "trainy.ai/accelerator" not in pod["metadata"]["labels"]


def test_konduktor_keeps_a_task_run_id() -> None:
    # A PLUTO_RUN_ID in the task's envs replaces Konduktor's: the template leaves its own out.
    pod = pod_specs.konduktor_pod(envs={"PLUTO_RUN_ID": "my-run"})
    entries = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "PLUTO_RUN_ID"]
    assert entries == [{"name": "PLUTO_RUN_ID", "value": "my-run"}]


def test_konduktor_resources_labels_stay_on_the_jobset() -> None:
    task_labels = pod_specs.konduktor_task()["resources"]["labels"]
    jobset = pod_specs.konduktor_jobset()
    pod = pod_specs.konduktor_pod()
    assert task_labels.items() <= jobset["metadata"]["labels"].items()
    assert not set(task_labels) & set(pod["metadata"]["labels"])
    assert jobset["metadata"]["labels"]["trainy.ai/job-name"] == "pluto-ddp-3f9a"
    assert "trainy.ai/job-name" not in pod["metadata"]["labels"]


def test_konduktor_resources_are_canonical_quantities() -> None:
    resources = pod_specs.konduktor_pod()["spec"]["containers"][0]["resources"]
    # The template writes cpu: 8.0 and memory: 32.0Gi; the API server re-serialises them.
    assert resources["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"}
    assert resources["requests"] == resources["limits"]


def test_konduktor_rank_must_be_a_node() -> None:
    with pytest.raises(ValueError, match=r"index 2 outside 0\.\.1"):
        pod_specs.konduktor_pod(rank=2)


# -- Job and JobSet ---------------------------------------------------------------------------


def test_indexed_job_pod() -> None:
    pod = pod_specs.indexed_job_pod(1)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"]["pluto.dev/run"] == "ddp-job"
    assert meta["labels"]["batch.kubernetes.io/job-name"] == meta["labels"]["job-name"] == "ddp-job"
    assert meta["labels"]["batch.kubernetes.io/controller-uid"] == meta["labels"]["controller-uid"]
    assert meta["labels"][INDEX] == meta["annotations"][INDEX] == "1"
    assert meta["generateName"] == "ddp-job-1-"
    assert meta["finalizers"] == ["batch.kubernetes.io/job-tracking"]
    (owner,) = meta["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"]) == ("batch/v1", "Job", "ddp-job")
    assert owner["uid"] == meta["labels"]["controller-uid"]
    assert (spec["hostname"], spec["subdomain"]) == ("ddp-job-1", "ddp-job")
    assert spec["restartPolicy"] == "Never"
    assert "JOB_COMPLETION_INDEX" in env_of(pod)
    assert "PLUTO_RUN_ID" not in env_of(pod)


def test_pod_with_run_id_sets_it() -> None:
    pod = pod_specs.pod_with_run_id("preset-run-7")
    assert env_of(pod)["PLUTO_RUN_ID"] == "preset-run-7"
    assert pod["metadata"]["labels"]["pluto.dev/run"] == "ddp-job"


def test_jobset_pod() -> None:
    pod = pod_specs.jobset_pod(1)
    meta, spec = pod["metadata"], pod["spec"]
    for marks in (meta["labels"], meta["annotations"]):
        assert marks["jobset.sigs.k8s.io/jobset-name"] == "ddp-jobset"
        assert marks["jobset.sigs.k8s.io/replicatedjob-name"] == "workers"
        assert marks["jobset.sigs.k8s.io/job-index"] == "0"
        assert marks["jobset.sigs.k8s.io/restart-attempt"] == "0"
        assert len(marks["jobset.sigs.k8s.io/job-key"]) == 40  # SHA-1 of namespace/job name
    assert "pluto.dev/run" not in meta["labels"]  # covered by the PlutoRun's selector instead
    assert meta["labels"]["batch.kubernetes.io/job-name"] == "ddp-jobset-workers-0"
    assert meta["generateName"] == "ddp-jobset-workers-0-1-"
    assert (spec["hostname"], spec["subdomain"]) == ("ddp-jobset-workers-0-1", "ddp-jobset")


# -- Kubeflow PyTorchJob ------------------------------------------------------------------------


def test_pytorchjob_master_pod() -> None:
    pod = pod_specs.pytorchjob_pod("master", 0, name="mnist-ddp", workers=3)
    meta = pod["metadata"]
    assert meta["name"] == "mnist-ddp-master-0" and "generateName" not in meta
    assert meta["labels"] == {
        "training.kubeflow.org/job-name": "mnist-ddp",
        "training.kubeflow.org/operator-name": "pytorchjob-controller",
        "training.kubeflow.org/replica-type": "master",
        "training.kubeflow.org/replica-index": "0",
        "training.kubeflow.org/job-role": "master",
    }
    (owner,) = meta["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["name"]) == (
        "kubeflow.org/v1", "PyTorchJob", "mnist-ddp"
    )
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "pytorch"
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container[
        "ports"]
    env = env_of(pod)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("mnist-ddp-master-0", "23456")
    assert (env["WORLD_SIZE"], env["RANK"], env["PYTHONUNBUFFERED"]) == ("4", "0", "0")
    assert "initContainers" not in pod["spec"]
    assert pod["spec"]["restartPolicy"] == "OnFailure"


def test_pytorchjob_worker_pod() -> None:
    pod = pod_specs.pytorchjob_pod("worker", 2, name="mnist-ddp", workers=3)
    labels = pod["metadata"]["labels"]
    assert pod["metadata"]["name"] == "mnist-ddp-worker-2"
    assert (labels["training.kubeflow.org/replica-type"],
            labels["training.kubeflow.org/replica-index"]) == ("worker", "2")
    assert "training.kubeflow.org/job-role" not in labels
    env = env_of(pod)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("3", "4", "mnist-ddp-master-0")
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == "init-pytorch"
    assert "nslookup mnist-ddp-master-0" in init["command"][-1]


# -- pods nobody opted in ---------------------------------------------------------------------


def test_plain_pod_opts_into_nothing() -> None:
    pod = pod_specs.plain_pod()
    labels = pod["metadata"]["labels"]
    assert labels == {"run": "debug"}
    assert not any(name.startswith("PLUTO_") for name in env_of(pod))
    assert "ownerReferences" not in pod["metadata"]
    assert pod["spec"]["restartPolicy"] == "Always"


# -- canonical quantities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (8.0, "8"), (8, "8"), ("32.0Gi", "32Gi"), ("4Gi", "4Gi"), ("1536Mi", "1536Mi"),
        ("2048Mi", "2Gi"), (0.5, "500m"), ("100m", "100m"), (4000, "4k"), ("1200", "1200"),
        ("0.5Gi", "512Mi"), ("512", "512"), (0, "0"),
    ],
)
def test_canonical_quantity(given: int | float | str, canonical: str) -> None:
    assert canonical_quantity(given) == canonical
