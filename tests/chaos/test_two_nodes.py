"""Two torchrun nodes, each with its own sidecar, logging into one run: every rank's
points arrive exactly once, and each sidecar carries only its node's ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.chaos import (
    DDP,
    PROJECT,
    SIDECAR_ARGS,
    ServerFactory,
    SidecarFactory,
    assert_exactly_once,
    expected_points,
    run_status,
    sidecar_metric,
    stored_points,
    stored_rows,
    wait_delivered,
)
from support.postgres import free_port

from pluto import query

# -- two nodes, one run -----------------------------------------------------------------


def test_two_torchrun_nodes_each_with_its_sidecar(server_factory: ServerFactory,
                                                  sidecar_factory: SidecarFactory,
                                                  tmp_path: Path) -> None:
    """Two torchrun groups (--nnodes=2, static rendezvous on loopback, gloo), each with
    its own sidecar, all ranks sharing PLUTO_RUN_ID: one run holds all four ranks'
    points exactly once, and each node's sidecar forwarded its own two ranks."""
    server = server_factory()
    sidecars = [sidecar_factory(server.url, extra_args=SIDECAR_ARGS, node_rank=node)
                for node in range(2)]
    steps, keys, run_ref = 8, 4, "two-nodes"
    out = tmp_path / "ranks"
    out.mkdir()
    port = free_port()
    launcher = Path(sys.executable).with_name("torchrun")
    prefix = [str(launcher)] if launcher.exists() else [sys.executable, "-m",
                                                        "torch.distributed.run"]
    nodes = []
    for node, sidecar in enumerate(sidecars):
        env = sidecar.client_env(PLUTO_RUN_ID=run_ref, PLUTO_PROJECT=PROJECT,
                                 GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        log = open(tmp_path / f"node-{node}.log", "wb")  # noqa: SIM115
        nodes.append((log, subprocess.Popen(
            [*prefix, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(DDP), str(out),
             str(steps)],
            cwd=tmp_path, env=env, stdout=log,
            stderr=subprocess.STDOUT)))
    try:
        for node, (log, proc) in enumerate(nodes):
            try:
                code = proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                code = None
            log.close()
            output = (tmp_path / f"node-{node}.log").read_text(errors="replace")[-5000:]
            assert code == 0, f"torchrun node {node} exited {code}:\n{output}"
    finally:
        for _, proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    reports = sorted((json.loads(p.read_text()) for p in out.glob("rank-*.json")),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["node"], r["writer"]) for r in reports] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 2), (3, 1, 3)]
    assert {r["run_id"] for r in reports} == {run_ref}
    assert len({r["id"] for r in reports}) == 1 and reports[0]["id"] > 0  # one run
    assert all(r["undelivered_bytes"] == 0 for r in reports), reports
    assert [r["socket"] for r in reports] == [str(sidecars[r["node"]].socket)
                                              for r in reports]

    expected = expected_points(range(4), steps, keys)
    waited = wait_delivered(server, sidecars, run_ref, sum(expected.values()), timeout=60)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"two nodes (waited {waited:.1f}s)")
    rows = stored_rows(server, run_ref)
    world = sorted((row.step, row.writer, row.value) for row in rows["ddp/world"])
    assert world == [(s, w, 6.0 + 4 * s) for s in range(steps) for w in range(4)]
    assert sorted((row.writer, row.step) for row in rows["ddp/loss"]) == [
        (w, s) for w in range(4) for s in range(steps)]
    assert len(query.list_runs(PROJECT, url=server.url)) == 1
    # Each node's sidecar carried its own two ranks' points, and only those.
    per_rank = steps * (keys + 2)
    for node, sidecar in enumerate(sidecars):
        assert sidecar_metric(sidecar, "points_in_total") == 2 * per_rank, f"node {node}"
        assert sidecar_metric(sidecar, "points_sent_total") == 2 * per_rank, f"node {node}"
    assert run_status(server, run_ref) == "COMPLETED"
