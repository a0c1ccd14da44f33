"""Checkpoints from a pod: the training process has only ``PLUTO_SIDECAR_SOCKET`` and
``PLUTO_RUN_ID``; saving, forking and loading go through the sidecar's API socket to a
server with auth on, and the sidecar adds the key."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from support.processes import die_with_parent
from support.server_process import ServerProcess, create_api_key
from support.sidecar_process import SidecarProcess

SAVE = """
import json, os, torch, pluto
torch.manual_seed(0)
model = torch.nn.Linear(8, 2)
run = pluto.init(project="pod")
for step in range(6):
    run.log({"loss": 1.0 / (step + 1)}, step=step)
info = run.save_checkpoint({"model": model}, step=5)
open("notes.txt", "w").write("lr 0.1 looked best")
run.log_file("notes.txt")
torch.save(model.state_dict(), "expected.pt")
print(json.dumps({"env": sorted(k for k in os.environ if k.startswith("PLUTO_")),
                  "step": info.step if info else None, "id": run.id,
                  "files": [f.name for f in run.files]}))
run.finish()
"""

FORK = """
import json, torch, pluto
run = pluto.init(project="pod", fork_run_id="parent", fork_step=5, fork_checkpoint=True)
state = torch.load(run.checkpoint_path / "checkpoint.pt", weights_only=True)
expected = torch.load("expected.pt", weights_only=True)
same = all(torch.equal(state["model"][k], v) for k, v in expected.items())
loaded = pluto.load_checkpoint("parent", not_after_step=5, project="pod")
print(json.dumps({"same": same, "loaded_same": all(
    torch.equal(loaded["model"][k], v) for k, v in expected.items()),
    "source": [c.source_step for c in run.checkpoints]}))
run.finish()
"""


def pod(script: str, env: dict[str, str], cwd: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=die_with_parent)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_pod_saves_forks_and_loads_checkpoints_without_credentials(
    server_factory: Callable[..., ServerProcess],
    sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path,
) -> None:
    server = server_factory(start=False, extra_args=["--auth"])
    key = create_api_key(server.data_dir, "pod")
    server.start()
    key_file = tmp_path / "api-key"
    key_file.write_text(key)
    sidecar = sidecar_factory(server.url, extra_args=["--api-key-file", str(key_file)])

    saved = pod(SAVE, sidecar.client_env(PLUTO_RUN_ID="parent"), tmp_path)
    assert saved["env"] == ["PLUTO_RUN_ID", "PLUTO_SIDECAR_SOCKET"]
    assert saved["step"] == 5 and saved["files"] == ["notes.txt"]

    forked = pod(FORK, sidecar.client_env(PLUTO_RUN_ID="child"), tmp_path)
    assert forked == {"same": True, "loaded_same": True, "source": [5]}
    assert key not in sidecar.logs() and key[-12:] not in sidecar.logs()
