"""What importing pluto costs: every rank of a job and every sidecar imports it.

httpx's command-line client (rich's console, click, pygments) and pluto's own progress bars
and tables (rich) are left out of ``import pluto`` and of ``pluto sidecar``: about 5 MB and
tens of ms per process (docs/benchmarks.md, "Import cost"). A module that imports one of
them at the top again fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.postgres import free_port

from pluto.cli import main as cli_main

#: Top-level packages that a process which only logs (or only runs the sidecar) never needs.
UNNEEDED = ("rich", "click", "pygments")

LOADED = """
import json, sys
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in {unneeded!r} or name == "httpx._main")))
"""


def loaded_after(code: str) -> list[str]:
    script = code + LOADED.format(unneeded=set(UNNEEDED))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_import_pluto_leaves_out_httpx_cli_and_rich() -> None:
    assert loaded_after("import pluto\nrun = pluto.Run") == []


def test_the_sidecar_command_leaves_them_out_too() -> None:
    code = ("from pluto.cli import build_parser\nbuild_parser()\n"
            "import pluto_sidecar.main, pluto_sidecar.sidecar\n")
    assert [name for name in loaded_after(code) if not name.startswith("click")] == []


@pytest.mark.parametrize("first", ["import pluto", "import httpx\nimport pluto"])
def test_httpx_cli_still_imports_for_whoever_wants_it(first: str) -> None:
    """The stand-in that keeps httpx's CLI out is gone once httpx is imported: a later
    ``import httpx._main`` (the training script's, say) gets the real module."""
    code = f"{first}\nimport httpx._main\nassert callable(httpx._main.main)\n"
    assert "httpx._main" in loaded_after(code)


def test_cli_errors_still_print_through_rich(capsys: pytest.CaptureFixture[str]) -> None:
    """rich is imported when a command prints, the error path included."""
    down = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["runs", "some-project", "--url", down]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and down in err
