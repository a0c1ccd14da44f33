"""End to end on a real Kubernetes cluster (skipped unless ``PLUTO_E2E_KUBECONFIG`` is set).

The operator runs on this machine in ``--dev`` mode, as a developer would run it, next to a
``pluto server``; the cluster calls the webhook and the pods' sidecars call the server at
``PLUTO_E2E_HOST``, an address of this machine the cluster can reach (the Docker bridge gateway
for kind). ``PLUTO_E2E_IMAGE`` is the pluto image the cluster can pull (kind.sh builds it from
the Dockerfile and loads it). ``tests/e2e/kind.sh`` sets all three up and runs this file.

What it checks: a PlutoRun and a 2-pod Indexed Job whose pods are labelled for it; the webhook
injects both pods; each pod's app container logs through its own sidecar; the PlutoRun reaches
Succeeded; the run on the server has the points of both nodes and is COMPLETED.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

KUBECONFIG = os.environ.get("PLUTO_E2E_KUBECONFIG")
HOST = os.environ.get("PLUTO_E2E_HOST", "")
IMAGE = os.environ.get("PLUTO_E2E_IMAGE", "ghcr.io/pluto-dev/pluto:0.1.0")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not KUBECONFIG,
    reason="needs a cluster: set PLUTO_E2E_KUBECONFIG and PLUTO_E2E_HOST (tests/e2e/kind.sh)")

NAMESPACE = "pluto-e2e"
TRAIN = """
import time, pluto
run = pluto.init()
for step in range(20):
    run.log({"loss": 1.0 / (step + 1)}, step=step)
    time.sleep(1)  # long enough for the sidecar's system metrics (every 10 s)
run.finish()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout:g}s")


@pytest.fixture(scope="module")
def local_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A tracking server and the operator (--dev) on this machine; (server URL, log dir)."""
    if not HOST:
        pytest.fail("PLUTO_E2E_HOST: an address of this machine the cluster can reach")
    logs = tmp_path_factory.mktemp("e2e")
    server_port, webhook_port = free_port(), free_port()
    server_url = f"http://{HOST}:{server_port}"
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "pluto", "server", "--host", HOST, "--port", str(server_port),
         "--data-dir", str(logs / "data")],
        stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    operator = subprocess.Popen(
        [sys.executable, "-m", "pluto", "operator", "--dev",
         "--webhook-url", f"https://{HOST}:{webhook_port}", "--webhook-host", HOST,
         "--health-host", "127.0.0.1", "--health-port", str(free_port()),
         "--server-url", server_url, "--sidecar-image", IMAGE, "--poll-interval", "2"],
        stdout=open(logs / "operator.log", "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    try:
        time.sleep(5)
        assert operator.poll() is None, (logs / "operator.log").read_text()
        yield server_url, str(logs)
    finally:
        for proc in (operator, server):
            proc.terminate()
            proc.wait(30)


def test_indexed_job_logs_through_injected_sidecars(local_processes: tuple[str, str]) -> None:
    from kubernetes import client, config, utils

    from pluto import query

    server_url, logs = local_processes
    api = config.new_client_from_config(config_file=KUBECONFIG)  # type: ignore[no-untyped-call]
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)
    utils.create_from_yaml(  # type: ignore[no-untyped-call]
        api, str(ROOT / "crds" / "plutorun.yaml"), apply=True)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    custom.create_namespaced_custom_object("pluto.dev", "v1alpha1", NAMESPACE, "plutoruns", {
        "apiVersion": "pluto.dev/v1alpha1", "kind": "PlutoRun",
        "metadata": {"name": "e2e"}, "spec": {"project": "e2e", "tags": ["e2e"]}})
    job = yaml.safe_load(f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: e2e}}
spec:
  completions: 2
  parallelism: 2
  completionMode: Indexed
  backoffLimit: 0
  template:
    metadata: {{labels: {{pluto.dev/run: e2e}}}}
    spec:
      restartPolicy: Never
      containers:
      - name: train
        image: {IMAGE}
        command: [python, -c]
        args: [{TRAIN!r}]
        env:
        - name: RANK   # one process per pod: its rank is the pod's index
          valueFrom:
            fieldRef:
              fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
""")
    batch.create_namespaced_job(NAMESPACE, job)

    def phase() -> str | None:
        obj = cast(dict[str, Any], custom.get_namespaced_custom_object(
            "pluto.dev", "v1alpha1", NAMESPACE, "plutoruns", "e2e"))
        value = (obj.get("status") or {}).get("phase")
        return value if value in ("Succeeded", "Failed") else None

    assert wait(phase, 600, f"PlutoRun e2e finished (logs in {logs})") == "Succeeded"
    pods = core.list_namespaced_pod(NAMESPACE, label_selector="pluto.dev/run=e2e").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.metadata is not None and pod.metadata.annotations is not None
        assert pod.metadata.annotations["pluto.dev/injected"] == "e2e"
    run = query.get_run("e2e", project="e2e", url=server_url)
    assert str(run.status) == "COMPLETED"
    loss = query.get_metrics(run.id, keys="loss", url=server_url)["loss"]
    assert sorted((row.writer, row.step) for row in loss) == sorted(
        (w, s) for w in (0, 1) for s in range(20))
    # Each node's sidecar logged its system metrics under its node rank.
    everything = query.get_metrics(run.id, url=server_url)
    system = [row for key, rows in everything.items() if key.startswith("sys/") for row in rows]
    assert {row.writer for row in system} == {0, 1}
    batch.delete_namespaced_job("e2e", NAMESPACE, propagation_policy="Foreground")
    custom.delete_namespaced_custom_object("pluto.dev", "v1alpha1", NAMESPACE, "plutoruns",
                                           "e2e")
