"""The fault-injection suite: real servers, sidecars and training processes, killed and
starved of disk. Helpers shared by its modules live in ``support/chaos.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _run_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes (``python -m pluto sidecar`` among them) start in the test's own
    directory: a folder of the repository root (``operator/``) must not shadow a stdlib
    module for ``python -m`` run from there."""
    monkeypatch.chdir(tmp_path)
