"""Pod-spec run: the operator webhook's real output, run as the kubelet would run it.

A user's torchrun training pod goes through the webhook (``admission.review`` with the real
``PodInjector``); the JSON patch it answers is applied as the API server applies it; the result
is started by the local kubelet (tests/support/kubelet.py: env resolution, emptyDir as a temp
dir, native sidecar first and gated by its startup probe, SIGTERM after the app exits). Two
ranks must log through the injected sidecar into a real tracking server, and the pod complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.admission import apply_answer, pod_review
from support.kubelet import LocalKubelet
from support.server_process import ServerProcess, create_api_key
from support.training_pod import Json, check_training_pod, training_pod

import pluto
from pluto import query
from pluto_operator.admission import review
from pluto_operator.injection import CLASSIC_IDLE_EXIT_SECONDS, Placement
from pluto_operator.model import PlutoRun
from pluto_operator.settings import OperatorSettings
from pluto_operator.targets import KnownRun, NamespaceInfo
from pluto_operator.webhook import PodInjector


class OneRunView:
    def __init__(self, run: KnownRun) -> None:
        self.run = run

    def namespace(self, name: str) -> NamespaceInfo | None:
        return None

    def runs(self, namespace: str) -> list[KnownRun]:
        return [self.run] if namespace == self.run.namespace else []


def webhook_mutated(pod: Json, *, server_url: str, project: str, run_id: str,
                    placement: Placement) -> Json:
    plutorun = PlutoRun.model_validate({
        "metadata": {"name": run_id, "namespace": "ml"},
        "spec": {"project": project, "server": {"url": server_url},
                 "selector": {"matchLabels": {"job-name": run_id}}},
    })
    view = OneRunView(KnownRun(run_id, "ml", "2026-01-01T00:00:00Z", plutorun))
    injector = PodInjector(OperatorSettings(), view, placement)
    answer = json.loads(review(json.dumps(pod_review(pod, "ml")).encode(), injector).body)
    assert answer["response"]["allowed"] is True
    mutated = apply_answer(pod, answer)
    assert mutated["metadata"]["annotations"]["pluto.dev/injected"] == run_id
    return mutated


def test_native_sidecar_pod_logs_both_ranks_into_the_server(
        server: ServerProcess, tmp_path: Path) -> None:
    pod = webhook_mutated(training_pod(steps=5, job="spec-run"), server_url=server.url,
                          project="podspec", run_id="spec-run", placement="native")
    result = check_training_pod(pod, server, tmp_path / "pod", run_id="spec-run",
                                project="podspec", steps=5)
    # The node rank came from the completion-index annotation through the downward API.
    assert result["pluto-sidecar"].env["PLUTO_NODE_RANK"] == "0"
    assert result["trainer"].env["PLUTO_RUN_ID"] == "spec-run"


def test_the_api_key_reaches_the_sidecar_as_a_file_from_the_secret(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """A server with auth: the webhook mounts the operator's API key Secret in the sidecar
    only (a file the kubelet rewrites on rotation, which the sidecar follows), never in the
    training container."""
    server = server_factory(start=False, extra_args=["--auth"])
    key = create_api_key(server.data_dir, "operator-secret")
    server.start()
    pod = webhook_mutated(training_pod(steps=4, job="keyed-run"), server_url=server.url,
                          project="podspec", run_id="keyed-run", placement="native")
    result = check_training_pod(pod, server, tmp_path / "pod", run_id="keyed-run",
                                project="podspec", steps=4, api_key=key,
                                secrets={"pluto-api-key": {"api-key": key}})
    assert "PLUTO_API_KEY" not in result["pluto-sidecar"].env
    assert key not in json.dumps(result["trainer"].env)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_classic_sidecar_exits_by_itself_so_the_pod_completes(
        server: ServerProcess, tmp_path: Path) -> None:
    """Before Kubernetes 1.29 the sidecar is an ordinary container that nobody stops: it must
    drain and exit on its own once the ranks are gone, or the Job never completes.

    One backend: what is tested is the sidecar's own exit (it waits out the operator's real
    30 s idle time), and the native pod test above covers both backends' data path."""
    pod = webhook_mutated(training_pod(steps=3, job="classic-run"), server_url=server.url,
                          project="podspec", run_id="classic-run", placement="classic")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["trainer", "pluto-sidecar"]
    kubelet = LocalKubelet(pod, workdir=tmp_path / "pod",
                           stuck_after=CLASSIC_IDLE_EXIT_SECONDS + 20)
    result = kubelet.run(timeout=CLASSIC_IDLE_EXIT_SECONDS + 120)
    assert result.phase == "Succeeded", result.describe()
    assert result.stuck_containers == []
    sidecar = result["pluto-sidecar"]
    assert sidecar.exit_code == 0 and sidecar.signals == [], result.describe()
    runs = query.list_runs("podspec", url=server.url)
    info = next(r for r in runs if r.run_id == "classic-run")
    assert info.status is pluto.RunStatus.COMPLETED
    loss = query.get_metrics(info.id, keys="train/loss", url=server.url)["train/loss"]
    assert sorted((row.writer, row.step) for row in loss) == sorted(
        (w, s) for w in (0, 1) for s in range(1, 4))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_two_host_network_pods_share_a_node_without_a_port_clash(
        server: ServerProcess, tmp_path: Path) -> None:
    """With ``hostNetwork`` a declared port is a host port and 0.0.0.0 is every address of the
    node: two training pods on one node would clash on the sidecar's health port (the
    scheduler keeps the second Pending; unscheduled, its sidecar cannot bind). The injected
    sidecar then listens on any free loopback port and is probed through its socket.

    The local kubelet runs every container in this host's network, which is exactly a
    hostNetwork pod, so with port remapping off the two pods below really share one."""
    pods = []
    for job in ("host-a", "host-b"):
        user_pod = training_pod(steps=3, job=job)
        user_pod["spec"]["hostNetwork"] = True
        pod = webhook_mutated(user_pod, server_url=server.url, project=f"podspec-{job}",
                              run_id=job, placement="native")
        sidecar = pod["spec"]["initContainers"][0]
        assert "ports" not in sidecar
        assert sidecar["startupProbe"]["exec"]["command"][:2] == ["test", "-S"]
        args = sidecar["args"]
        assert args[args.index("--health-host") + 1] == "127.0.0.1"
        assert args[args.index("--health-port") + 1] == "0"
        pods.append((job, pod))

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(
            lambda item: check_training_pod(item[1], server, tmp_path / item[0], run_id=item[0],
                                            project=f"podspec-{item[0]}", steps=3,
                                            port_remap=None),
            pods))
    for result in results:
        assert result["pluto-sidecar"].startup_passed_at is not None
