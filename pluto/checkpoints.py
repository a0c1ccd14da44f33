"""Checkpoints and files of runs: log, list, download, load, and fork them.

    run.save_checkpoint({"model": model, "optim": optim})       # at the current step
    state = pluto.load_checkpoint("MMP-3", not_after_step=500)  # newest at or before 500
    pluto.fork_checkpoint(to_run="MMP-9", from_run="MMP-3", not_after_step=500)

A checkpoint is a file or a directory (its structure kept) attached to a run at a
step. Forking one copies the newest checkpoint of the source's lineage at or before
a step to another run at the same step number; the bytes are content-addressed on
the server, so the copy moves none of them.

In a pod with the pluto sidecar, these calls go through the sidecar's API socket and
the training container needs no credentials; elsewhere they go to ``PLUTO_URL`` with
``PLUTO_API_KEY``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluto import torch_io
from pluto.settings import Settings, default_dir
from pluto.transfer import Transfer, collect
from pluto.transport.http import ApiClient
from pluto.wire import (
    CheckpointCreate,
    CheckpointFork,
    CheckpointInfo,
    CheckpointList,
    FileCreate,
    FileInfo,
    FileList,
)

if TYPE_CHECKING:
    from pluto.run import Run

def client_for(settings: Settings | None = None, *, url: str | None = None,
               api_key: str | None = None) -> ApiClient:
    """Through the sidecar's API socket when there is a sidecar, else to the server."""
    settings = settings or Settings()
    if url is None and settings.sidecar_socket and settings.api_socket:
        return ApiClient(settings.url, None, settings.http_timeout, uds=settings.api_socket)
    return ApiClient(url or settings.url, api_key if api_key is not None else settings.api_key,
                     settings.http_timeout)


def _ref(run: Run | str | int, project: str | None) -> tuple[str, str | None]:
    from pluto.run import Run

    if isinstance(run, Run):
        return run._api_ref, run.project
    return str(run), project or os.environ.get("PLUTO_PROJECT")


def _params(project: str | None) -> dict[str, Any]:
    return {"project": project} if project else {}


# -- writing ------------------------------------------------------------------------


def log_checkpoint(client: ApiClient, run_ref: str, project: str | None, path: Path,
                   step: int, metadata: dict[str, Any] | None = None,
                   quiet: bool = False) -> CheckpointInfo:
    transfer = Transfer(client, run_ref, project, quiet=quiet)
    entries = transfer.upload(collect(path), f"checkpoint {step}")
    return client.call("POST", f"/runs/{run_ref}/checkpoints", CheckpointInfo,
                       body=CheckpointCreate(step=step, files=entries, metadata=metadata or {}),
                       params=_params(project))


def save_checkpoint(client: ApiClient, run_ref: str, project: str | None, obj: Any,
                    step: int, metadata: dict[str, Any] | None = None,
                    quiet: bool = False) -> CheckpointInfo:
    with tempfile.TemporaryDirectory(prefix="pluto-checkpoint-") as scratch:
        target = Path(scratch) / torch_io.CHECKPOINT_FILE
        torch_io.save(obj, target)
        return log_checkpoint(client, run_ref, project, Path(scratch), step, metadata, quiet)


def log_file(client: ApiClient, run_ref: str, project: str | None, path: Path,
             name: str | None, step: int | None, quiet: bool = False) -> FileInfo:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file (log a directory as a checkpoint)")
    name = name or path.name
    transfer = Transfer(client, run_ref, project, quiet=quiet)
    [entry] = transfer.upload([(name, path)], name)
    return client.call("POST", f"/runs/{run_ref}/files", FileInfo,
                       body=FileCreate(name=name, size=entry.size, sha256=entry.sha256,
                                       step=step),
                       params=_params(project))


# -- reading ------------------------------------------------------------------------


def list_checkpoints(run: Run | str | int, *, project: str | None = None,
                     lineage: bool = False, url: str | None = None,
                     api_key: str | None = None,
                    settings: Settings | None = None) -> list[CheckpointInfo]:
    """A run's checkpoints by step (``lineage=True``: every one a fork could start from,
    its ancestors' included up to the fork steps)."""
    ref, project = _ref(run, project)
    with client_for(settings, url=url, api_key=api_key) as client:
        return client.call("GET", f"/runs/{ref}/checkpoints", CheckpointList,
                           params={**_params(project), "lineage": str(lineage).lower()}
                           ).checkpoints


def find_checkpoint(run: Run | str | int, step: int | None = None,
                    not_after_step: int | None = None, *, project: str | None = None,
                    url: str | None = None, api_key: str | None = None,
                    settings: Settings | None = None) -> CheckpointInfo:
    """The checkpoint at ``step``, or the newest at or before ``not_after_step`` (newest
    overall when neither is given), looking through the run's lineage."""
    ref, project = _ref(run, project)
    with client_for(settings, url=url, api_key=api_key) as client:
        return _resolve(client, ref, project, step, not_after_step)


def _resolve(client: ApiClient, ref: str, project: str | None, step: int | None,
             not_after_step: int | None) -> CheckpointInfo:
    params = _params(project)
    if step is not None:
        params["step"] = step
    if not_after_step is not None:
        params["not_after_step"] = not_after_step
    return client.call("GET", f"/runs/{ref}/checkpoints/resolve", CheckpointInfo, params=params)


def download(client: ApiClient, info: CheckpointInfo, dest: Path | None = None,
             quiet: bool = False) -> Path:
    """Fetch a checkpoint's files into ``dest`` (default: a cache under ``PLUTO_DIR``)."""
    dest = dest if dest is not None else cache_dir(info)
    transfer = Transfer(client, str(info.run), None, quiet=quiet)
    files = [(f"checkpoints/{info.step}/files/{entry.path}", entry) for entry in info.files]
    return transfer.download(files, dest, f"checkpoint {info.step} of {info.run_display_id}")


def cache_dir(info: CheckpointInfo) -> Path:
    return default_dir(None) / "checkpoints" / info.run_display_id / str(info.step)


def download_checkpoint(run: Run | str | int, step: int | None = None,
                        dest: str | os.PathLike[str] | None = None, *,
                        not_after_step: int | None = None, project: str | None = None,
                        quiet: bool = False, url: str | None = None,
                        api_key: str | None = None,
                    settings: Settings | None = None) -> Path:
    """Download a checkpoint (see ``find_checkpoint`` for which) into ``dest``; its path."""
    ref, project = _ref(run, project)
    with client_for(settings, url=url, api_key=api_key) as client:
        info = _resolve(client, ref, project, step, not_after_step)
        return download(client, info, Path(dest) if dest is not None else None, quiet)


def load_checkpoint(run_or_id: Run | str | int, step: int | None = None,
                    not_after_step: int | None = None, map_location: Any = None, *,
                    project: str | None = None, weights_only: bool = True,
                    quiet: bool = False, url: str | None = None,
                    api_key: str | None = None,
                    settings: Settings | None = None) -> Any:
    """What ``save_checkpoint`` saved (state dicts in place of modules and optimizers),
    loaded with ``torch.load(map_location=...)``."""
    ref, project = _ref(run_or_id, project)
    with client_for(settings, url=url, api_key=api_key) as client:
        info = _resolve(client, ref, project, step, not_after_step)
        names = [entry.path for entry in info.files]
        if torch_io.CHECKPOINT_FILE not in names:
            raise ValueError(
                f"checkpoint {info.step} of {info.run_display_id} was not written by "
                f"save_checkpoint (it holds {', '.join(names[:10])}): fetch its files with "
                "pluto.download_checkpoint() and load them yourself"
            )
        path = download(client, info, quiet=quiet)
    return torch_io.load(path / torch_io.CHECKPOINT_FILE, map_location, weights_only)


# -- forking ------------------------------------------------------------------------


def fork_checkpoint(to_run: Run | str | int, from_run: Run | str | int,
                    from_project: str | None = None, not_after_step: int | None = None,
                    from_s3_bucket: str | None = None, verbose: bool = False, *,
                    project: str | None = None, url: str | None = None,
                    api_key: str | None = None,
                    settings: Settings | None = None) -> CheckpointInfo:
    """Copy the newest checkpoint at or before ``not_after_step`` (newest overall when
    None) of ``from_run``'s lineage to ``to_run``, at the same step number.

    ``from_s3_bucket``: take it from that bucket, laid out as OpenPipe ART does
    (``<from_project>/models/<from_run>/checkpoints/<step>/``). Only that checkpoint is
    copied, on the server; nothing else (metrics, logs) is.
    """
    to_ref, project = _ref(to_run, project)
    from_ref = from_run._api_ref if not isinstance(from_run, str | int) else str(from_run)
    if not isinstance(from_run, str | int) and from_project is None:
        from_project = from_run.project
    with client_for(settings, url=url, api_key=api_key) as client:
        info = client.call("POST", f"/runs/{to_ref}/checkpoints/fork", CheckpointInfo,
                           body=CheckpointFork(from_run=from_ref, from_project=from_project,
                                               not_after_step=not_after_step,
                                               from_s3_bucket=from_s3_bucket),
                           params=_params(project))
    if verbose:
        from rich.console import Console  # here: ``import pluto`` does without rich

        origin = info.source_uri or f"{info.source_display_id} step {info.source_step}"
        Console(file=sys.stderr).print(
            f"pluto: forked checkpoint {origin} ({human_size(info.size)}, {len(info.files)} "
            f"files) to {info.run_display_id} at step {info.step}")
    return info


def list_files(run: Run | str | int, *, project: str | None = None, url: str | None = None,
               api_key: str | None = None,
               settings: Settings | None = None) -> list[FileInfo]:
    ref, project = _ref(run, project)
    with client_for(settings, url=url, api_key=api_key) as client:
        return client.call("GET", f"/runs/{ref}/files", FileList, params=_params(project)).files


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{value:.1f} TiB"
