"""A torchrun training pod as a user writes it, and the check that it logged into a server.

Shared by the kubelet harness's own test (a hand-injected pod) and the pod-spec run of the
operator's real webhook output (tests/test_pod_spec_run.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pluto
from pluto import query
from support.kubelet import PodResult, run_pod
from support.server_process import ServerProcess

Json = dict[str, Any]


def training_pod(*, steps: int, job: str, namespace: str = "ml",
                 labels: dict[str, str] | None = None) -> Json:
    """A Job's training pod as a user writes it: torchrun, 2 ranks, no Pluto settings."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-0-x7k2p", "namespace": namespace,
            "labels": {"job-name": job, "batch.kubernetes.io/job-completion-index": "0",
                       **(labels or {})},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "trainer", "image": "pytorch/pytorch:2", "command": ["torchrun"],
                "args": ["--standalone", "--nproc-per-node", "2", "examples/train.py",
                         "--steps", str(steps)],
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            }],
        },
    }


def check_training_pod(pod: Json, server: ServerProcess, workdir: Path, *, run_id: str,
                       project: str, steps: int,
                       secrets: dict[str, dict[str, str]] | None = None,
                       api_key: str | None = None, **kubelet_options: Any) -> PodResult:
    """Runs a mutated training pod; asserts that both ranks' points reached ``server``
    through the sidecar, that the pod succeeded and that the sidecar drained on SIGTERM.
    ``api_key``: for a server with auth, to read back what arrived. ``kubelet_options``:
    more keyword arguments of the ``LocalKubelet``."""
    result = run_pod(pod, workdir=workdir, secrets=secrets, timeout=120, **kubelet_options)
    assert result.phase == "Succeeded", result.describe()
    sidecar, trainer = result["pluto-sidecar"], result["trainer"]
    assert sidecar.signals == ["SIGTERM"] and sidecar.exit_code == 0, result.describe()
    assert trainer.started_at is not None and sidecar.startup_passed_at is not None
    assert trainer.started_at >= sidecar.startup_passed_at  # the native sidecar came first
    assert "PLUTO_API_KEY" not in trainer.env  # credentials stay with the sidecar

    runs = query.list_runs(project, url=server.url, api_key=api_key)
    assert [r.run_id for r in runs] == [run_id], result.describe()
    info = query.get_run(runs[0].id, url=server.url, api_key=api_key)
    assert info.status is pluto.RunStatus.COMPLETED, result.describe()
    assert info.config.get("world_size") == 2
    loss = query.get_metrics(info.id, keys="train/loss", url=server.url,
                             api_key=api_key)["train/loss"]
    assert Counter(row.writer for row in loss) == Counter({0: steps, 1: steps})
    assert sorted({row.step for row in loss}) == list(range(1, steps + 1))
    return result


