"""64 processes attach to one run id at the same instant: one run, one creator.

Each process imports pluto and waits on its stdin; all are released together, so their
``pluto.init()`` calls reach the server within a few milliseconds of each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
from support.processes import die_with_parent, terminate
from support.server_process import ServerProcess

from pluto.wire import API_PREFIX

PROCESSES = 64

ATTACH = """
import json, sys, pluto
sys.stdin.readline()  # the starting gun
run = pluto.init(name=f"rank-{sys.argv[1]}", settings={"console": False, "init_timeout": 60})
print(json.dumps({"id": run.id, "resumed": run.resumed, "display": run.display_id,
                  "name": run.name}))
run.finish()
"""


def test_64_processes_attaching_at_once_make_one_run_with_one_creator(
    server: ServerProcess, tmp_path: Path
) -> None:
    project = f"storm-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "MLOP_"))}
    env.update(PLUTO_URL=server.url, PLUTO_PROJECT=project, PLUTO_RUN_ID="job-64",
               PLUTO_CONSOLE="0", OMP_NUM_THREADS="1")
    procs = []
    try:
        for rank in range(PROCESSES):
            work = tmp_path / f"rank-{rank}"
            work.mkdir()
            procs.append(subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(ATTACH), str(rank)], cwd=work,
                env={**env, "RANK": str(rank)}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=die_with_parent))
        for proc in procs:  # all are importing or waiting by now; release them together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.flush()
        answers = []
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-2000:]
            answers.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            terminate(proc, 5)  # type: ignore[arg-type]

    creators = [a for a in answers if not a["resumed"]]
    assert len(creators) == 1, creators
    assert len({a["id"] for a in answers}) == 1
    assert len({a["display"] for a in answers}) == 1
    assert {a["name"] for a in answers} == {creators[0]["name"]}  # the creator's name
    listed = httpx.get(f"{server.url}{API_PREFIX}/projects/{project}/runs", timeout=30)
    assert [r["id"] for r in listed.json()["runs"]] == [creators[0]["id"]]
