"""One adapter per tracker: start a run fully offline/local, log a step, finish.

This module runs in two interpreters: ours in ``.venv`` and the other trackers in
``.venv-anchors``. It therefore imports nothing outside the standard library at module
level; each tracker's package is imported inside its own ``start_*`` function through
``importlib`` (typed ``Any``), so mypy checks this file in ``.venv`` without the anchors'
packages being installed there.

Every adapter hands back the tracker's own bound ``log`` callable where the tracker's API
takes ``(values, step)`` positionally, so the timed call is the tracker's entry point and
nothing of ours; only mlflow needs a keyword, passed through ``functools.partial`` (a C
call, tens of nanoseconds).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

NAMES = ("pluto", "wandb", "trackio", "neptune-scale", "mlflow")
# The distribution whose version is reported for each tracker.
DISTRIBUTIONS = {"pluto": "pluto-k8s", "wandb": "wandb", "trackio": "trackio",
                 "neptune-scale": "neptune-scale", "mlflow": "mlflow"}

LogFn = Callable[[dict[str, float], int], Any]


@dataclass
class Session:
    """A started run: ``log(values, step)`` is what the loop times; ``finish()`` ends it."""

    log: LogFn
    finish: Callable[[], Any]


def configure_env(name: str, workdir: Path) -> None:
    """Point the tracker at ``workdir`` and keep it off the network.

    Set before the tracker is imported: several read their settings at import time
    (trackio resolves ``TRACKIO_DIR`` into a module constant)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # trackio's huggingface_hub never looks online
    if name == "wandb":
        os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(workdir), WANDB_SILENT="true",
                          WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true",
                          WANDB_CACHE_DIR=str(workdir / "cache"),
                          WANDB_CONFIG_DIR=str(workdir / "config"),
                          WANDB_DATA_DIR=str(workdir / "data"))
    elif name == "trackio":
        os.environ["TRACKIO_DIR"] = str(workdir / "trackio")
    elif name == "neptune-scale":
        # Offline mode writes a local SQLite file and never uses the token; the client
        # still insists on a "workspace/project" name, so both are placeholders.
        os.environ.update(NEPTUNE_MODE="offline", NEPTUNE_PROJECT="bench/anchors",
                          NEPTUNE_API_TOKEN="offline-dummy-token",
                          NEPTUNE_LOG_DIRECTORY=str(workdir / "neptune"))
    elif name == "mlflow":
        os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
                          MLFLOW_ENABLE_ASYNC_LOGGING="true",
                          MLFLOW_ARTIFACT_ROOT=str(workdir / "artifacts"))


def start(name: str, workdir: Path, run_name: str, pluto_url: str | None) -> Session:
    """Start a run of tracker ``name`` (``configure_env`` must have run first)."""
    if name == "pluto":
        return _start_pluto(workdir, run_name, pluto_url)
    starters: dict[str, Callable[[Path, str], Session]] = {
        "wandb": _start_wandb, "trackio": _start_trackio,
        "neptune-scale": _start_neptune, "mlflow": _start_mlflow,
    }
    return starters[name](workdir, run_name)


def _start_pluto(workdir: Path, run_name: str, url: str | None) -> Session:
    pluto: Any = importlib.import_module("pluto")
    settings: dict[str, Any] = {"console": False}
    if url:
        settings["url"] = url
    run = pluto.init(project="anchors", run_id=run_name, dir=workdir / "pluto",
                     settings=settings)
    return Session(log=run.log, finish=run.finish)


def _start_wandb(workdir: Path, run_name: str) -> Session:
    wandb: Any = importlib.import_module("wandb")
    # No system-metrics sampler, console capture or code/requirements snapshots: ours does
    # none of these in the benchmark either, and they would only add background CPU.
    settings = wandb.Settings(mode="offline", console="off", x_disable_stats=True,
                              x_disable_meta=True, x_save_requirements=False, save_code=False,
                              disable_git=True, silent=True)
    run = wandb.init(project="anchors", name=run_name, dir=str(workdir), settings=settings)
    return Session(log=run.log, finish=run.finish)


def _start_trackio(workdir: Path, run_name: str) -> Session:
    trackio: Any = importlib.import_module("trackio")
    run = trackio.init(project="anchors", name=run_name, embed=False, auto_log_gpu=False,
                       auto_log_cpu=False)
    return Session(log=run.log, finish=run.finish)


def _start_neptune(workdir: Path, run_name: str) -> Session:
    neptune_scale: Any = importlib.import_module("neptune_scale")
    run = neptune_scale.Run(run_id=run_name, mode="offline",
                            log_directory=str(workdir / "neptune"),
                            enable_console_log_capture=False, source_tracking_config=None)
    return Session(log=run.log_metrics, finish=run.close)


def _start_mlflow(workdir: Path, run_name: str) -> Session:
    mlflow: Any = importlib.import_module("mlflow")
    mlflow.set_experiment("anchors")
    mlflow.start_run(run_name=run_name)
    # end_run() shuts the async queue down and waits until it is written to SQLite.
    return Session(log=functools.partial(mlflow.log_metrics, synchronous=False),
                   finish=mlflow.end_run)


def version(name: str) -> str:
    """The installed version of tracker ``name``'s distribution."""
    try:
        return str(metadata.version(DISTRIBUTIONS[name]))
    except Exception:  # a distribution renamed or installed oddly: the table says so
        return "?"
