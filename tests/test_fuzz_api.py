"""Schemathesis against the server's own OpenAPI document: no input makes it answer 5xx,
and every answer is the one documented (status code, content type, body schema).

A real server with a run that has points, a log line, a checkpoint and a file, so that
generated requests reach the routes' logic instead of stopping at 404. The seed is in
the failure message: ``schemathesis run ... --seed SEED`` replays it.
"""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import msgspec
from support.server_process import ServerProcess

import pluto
from pluto.wire import Chunk, IngestBatch, LogLine

MAX_EXAMPLES = 40
#: No 5xx, and every answer as documented: its status code, content type and body schema.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")


def test_no_generated_request_gets_a_server_error(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    run = pluto.init(project="fuzz", run_id="fuzzed", dir=tmp_path / "pluto",
                     settings={"url": shared_server.url, "console": False})
    for step in range(20):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights" * 100)
    assert run.log_checkpoint(weights, step=3) is not None
    assert run.log_file(weights, name="notes.txt") is not None
    run.finish()
    # A console line, as a rank's captured output arrives (console capture is off above:
    # pytest owns this process's stdout), so that the logs route has a page to serve.
    line = Chunk(run=run.id, session=uuid.uuid4().hex, seq=0, writer=0, keys=["loss"],
                 key_index=[0], steps=[20], values=[0.01], times=[1.0],
                 logs=[LogLine(time=1.0, stream=1, line="epoch 1 done")])
    stored = httpx.post(f"{shared_server.url}/api/v1/ingest", timeout=10,
                        content=msgspec.msgpack.encode(IngestBatch(chunks=[line])),
                        headers={"content-type": "application/msgpack"})
    assert stored.status_code == 200, stored.text
    logs = httpx.get(f"{shared_server.url}/api/v1/runs/{run.id}/logs", timeout=10)
    assert "epoch 1 done" in logs.text, logs.text

    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.ref" = "{run.id}"\n"path.step" = 3\n'
                      '"path.project" = "fuzz"\n"path.path" = "w.bin"\n'
                      '"path.name" = "notes.txt"\n')
    seed = random.randrange(2**32)
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"{shared_server.url}/api/openapi.json", "--checks", ",".join(CHECKS),
               "--phases", "coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
               "--seed", str(seed), "--no-color"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, (f"seed {seed}:\n" + done.stdout[-6000:] + done.stderr[-2000:])
    assert "generated" in done.stdout and "22/22" in done.stdout  # every operation was tried
