"""Real ``torchrun`` jobs (gloo, CPU) whose ranks all log to one run.

Every rank calls ``pluto.init`` with the same ``PLUTO_RUN_ID``: exactly one
creates the run, the others attach (``resumed=True``), each rank's points
carry its rank as writer, and points of different ranks at the same key and
step are all kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from support.server_process import ServerProcess

import pluto
from pluto import query
from pluto.query import MetricRow

ROOT = Path(__file__).resolve().parent.parent
DDP_SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_log.py"
TRAIN_EXAMPLE = ROOT / "examples" / "train.py"



@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLUTO_RUN_ID", raising=False)
    monkeypatch.delenv("MLOP_RUN_ID", raising=False)


def metrics(server: ServerProcess, run: int, **kwargs: Any) -> dict[str, list[MetricRow]]:
    """Raw (not downsampled) points per key."""
    return cast(dict[str, list[MetricRow]], query.get_metrics(run, url=server.url, **kwargs))


def torchrun(
    nproc: int, script: Path, *args: str, env: dict[str, str], cwd: Path, timeout: float = 150
) -> subprocess.CompletedProcess[str]:
    launcher = Path(sys.executable).with_name("torchrun")
    prefix = (
        [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    proc = subprocess.run(
        [*prefix, "--standalone", f"--nproc_per_node={nproc}", str(script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def test_four_ranks_share_one_run(
    server: ServerProcess, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    steps = 10
    out = tmp_path / "ranks"
    out.mkdir()
    env = env_for(server, PLUTO_RUN_ID="ddp-job-1", PLUTO_PROJECT="ddp", OMP_NUM_THREADS="1")
    torchrun(4, DDP_SCRIPT, str(out), str(steps), env=env, cwd=tmp_path)

    reports = sorted(
        (json.loads(p.read_text()) for p in out.glob("rank-*.json")), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    assert {r["id"] for r in reports} == {reports[0]["id"]}  # one run for every rank
    assert {r["run_id"] for r in reports} == {"ddp-job-1"}
    assert sorted(r["resumed"] for r in reports) == [False, True, True, True]  # one creator
    assert [r["writer"] for r in reports] == [0, 1, 2, 3]

    runs = query.list_runs("ddp", url=server.url)
    assert [(r.id, r.run_id) for r in runs] == [(reports[0]["id"], "ddp-job-1")]
    run_id = runs[0].id
    assert query.get_run(run_id, url=server.url).status is pluto.RunStatus.COMPLETED

    got = metrics(server, run_id)
    assert set(got) == {"train/loss", "shared/x", *(f"rank{r}/only" for r in range(4))}

    # the same key at the same step from four ranks: four points, none overwritten
    shared = got["shared/x"]
    assert len(shared) == 4 * steps
    per_step: dict[int, list[tuple[int | None, float]]] = {}
    for row in shared:
        per_step.setdefault(row.step, []).append((row.writer, row.value))
    assert sorted(per_step) == list(range(steps))
    for step, points in per_step.items():
        assert sorted(points) == [(w, float(w)) for w in range(4)], step

    loss = Counter((row.writer, row.step) for row in got["train/loss"])
    assert loss == Counter({(w, s): 1 for w in range(4) for s in range(steps)})
    for rank in range(4):
        only = got[f"rank{rank}/only"]
        assert [(r.writer, r.step, r.value) for r in only] == [
            (rank, s, float(s)) for s in range(steps)
        ]

    # split by writer, and aggregated across writers
    one_writer = metrics(server, run_id, keys="shared/x", writer=2)
    assert [(r.writer, r.value) for r in one_writer["shared/x"]] == [(2, 2.0)] * steps
    mean = metrics(server, run_id, keys="shared/x", aggregate="mean")
    assert [(r.step, r.value) for r in mean["shared/x"]] == [(s, 1.5) for s in range(steps)]


def test_train_example_logs_and_completes(
    server_factory: Callable[..., ServerProcess],
    env_for: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """The shipped example, on the embedded default (the backends are covered above)."""
    server = server_factory()
    steps = 20
    env = env_for(server, PLUTO_RUN_ID="example-1", OMP_NUM_THREADS="1")
    args = ["--steps", str(steps), "--project", "example"]
    proc = torchrun(2, TRAIN_EXAMPLE, *args, env=env, cwd=tmp_path)
    assert "done" in proc.stdout

    runs = query.list_runs("example", url=server.url)
    assert len(runs) == 1 and runs[0].run_id == "example-1"
    info = query.get_run(runs[0].id, url=server.url)
    assert info.status is pluto.RunStatus.COMPLETED
    assert info.config.get("world_size") == 2

    got = metrics(server, info.id)
    assert {"train/loss", "train/lr"} <= set(got)
    loss = got["train/loss"]
    assert {row.writer for row in loss} == {0, 1}
    per_writer = Counter(row.writer for row in loss)
    assert per_writer[0] == per_writer[1] == steps
    assert max(row.step for row in loss) == steps
    assert all(row.value == row.value for row in loss)  # no NaN from a broken loop
    if "train/grad_norm" in got:
        assert {row.writer for row in got["train/grad_norm"]} == {0}
