"""``pluto.init()`` and the module-level ``log`` / ``finish`` that act on the newest run."""

from __future__ import annotations

import atexit
import os
import secrets
import sys
import threading
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pluto import checkpoints
from pluto.digits import parse_digits
from pluto.gpus import GpuLookup
from pluto.pipeline import Pipeline
from pluto.settings import Settings, default_dir
from pluto.transport.base import Transport
from pluto.transport.http import HttpTransport, check_server_url
from pluto.transport.sidecar import SidecarTransport
from pluto.values import MetadataCleaner
from pluto.wire import RunCreate, RunStatus

if TYPE_CHECKING:
    from pluto.run import Run

DEFAULT_PROJECT = "default"

_runs: list[Run] = []
_lock = threading.Lock()
_hooks_installed = False
_uncaught: list[type[BaseException]] = []


@dataclass(frozen=True)
class _EnvironmentFork:
    run_id: str
    step: int
    inherit_config: bool | None
    inherit_tags: bool | None


def _fork_from_environment() -> _EnvironmentFork | None:
    """``PLUTO_FORK_RUN_ID`` and ``PLUTO_FORK_STEP`` (and optionally
    ``PLUTO_FORK_INHERIT_CONFIG`` / ``PLUTO_FORK_INHERIT_TAGS``, ``true`` or ``false``), set
    by the operator next to ``PLUTO_RUN_ID`` in the pods of a PlutoRun with a fork: the run
    those pods share is that fork, whichever of them (or the operator) opens it first.
    Used only when the run id itself comes from ``PLUTO_RUN_ID``; ``ValueError`` naming the
    variable when they cannot work."""
    parent = os.environ.get("PLUTO_FORK_RUN_ID") or None
    step_text = os.environ.get("PLUTO_FORK_STEP") or None
    if parent is None and step_text is None:
        return None
    if parent is None or step_text is None:
        missing = "PLUTO_FORK_STEP" if step_text is None else "PLUTO_FORK_RUN_ID"
        raise ValueError(f"PLUTO_FORK_RUN_ID and PLUTO_FORK_STEP go together: {missing} is "
                         "not set; set both to fork, or neither")
    step = parse_digits(step_text.strip())
    if step is None:
        raise ValueError(f"PLUTO_FORK_STEP must be a whole number >= 0, got {step_text!r}")

    def flag(name: str) -> bool | None:
        text = os.environ.get(name, "").strip().lower()
        if not text:
            return None
        if text in ("1", "true", "yes"):
            return True
        if text in ("0", "false", "no"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")

    return _EnvironmentFork(parent, step, flag("PLUTO_FORK_INHERIT_CONFIG"),
                            flag("PLUTO_FORK_INHERIT_TAGS"))


def init(
    project: str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    tags: list[str] | str | None = None,
    run_id: str | None = None,
    resume: bool = False,
    fork_run_id: str | int | None = None,
    fork_step: int | None = None,
    inherit_config: bool | None = None,
    inherit_tags: bool | None = None,
    fork_checkpoint: bool = False,
    dir: str | os.PathLike[str] | None = None,
    settings: Settings | dict[str, Any] | None = None,
) -> Run:
    """Start a run, attach to a shared one, or fork one at a step.

    Every process that passes the same ``run_id`` (or has the same
    ``PLUTO_RUN_ID``) in the same project gets the same run: exactly one creates
    it, the others get ``resumed=True``. ``resume=True`` additionally requires
    the run to exist already (``run_id`` may then be its numeric or display id).

    ``fork_checkpoint=True`` (with ``fork_run_id`` and ``fork_step``) also copies the
    newest checkpoint of the parent's lineage at or before ``fork_step`` to the new run
    and downloads it: ``run.checkpoint_path`` is then a local directory ready to load.
    """
    from pluto.run import Run

    if (fork_run_id is None) != (fork_step is None):
        missing = "fork_step" if fork_step is None else "fork_run_id"
        raise ValueError(f"fork_run_id and fork_step go together: {missing} is missing")
    if fork_step is not None and (type(fork_step) is not int or fork_step < 0):
        raise ValueError(f"fork_step must be an int >= 0, got {fork_step!r}")
    if fork_checkpoint and fork_run_id is None:
        raise ValueError("fork_checkpoint=True needs fork_run_id and fork_step")
    if fork_run_id is None and (inherit_config is not None or inherit_tags is not None):
        warnings.warn("pluto: inherit_config/inherit_tags only apply to forks; ignored",
                      RuntimeWarning, stacklevel=2)
    resolved = Settings.build(settings)
    if not resolved.sidecar_socket:
        check_server_url(resolved.url)  # before any request: a typo is not an outage
    root = default_dir(dir)
    _check_spool_root(Path(root) / "spool")  # before the run exists on the server
    project = project or os.environ.get("PLUTO_PROJECT") or DEFAULT_PROJECT
    if run_id is None and fork_run_id is None and not resume and os.environ.get("PLUTO_RUN_ID"):
        # The operator's pods of a forked PlutoRun: whichever process opens the run first
        # must open it as that fork (see _fork_from_environment).
        fork = _fork_from_environment()
        if fork is not None:
            fork_run_id, fork_step = fork.run_id, fork.step
            inherit_config = fork.inherit_config if inherit_config is None else inherit_config
            inherit_tags = fork.inherit_tags if inherit_tags is None else inherit_tags
    external = run_id or os.environ.get("PLUTO_RUN_ID") or os.environ.get("MLOP_RUN_ID")
    if external is None:
        if resume:
            raise ValueError("resume=True needs run_id= (or PLUTO_RUN_ID) naming the run")
        # A fresh id makes a retried create idempotent instead of making two runs.
        external = secrets.token_hex(8)
    # Config, tags and name are made storable here (with a warning), not refused: see
    # values.MetadataCleaner for the values that used to make init() raise.
    cleaner = MetadataCleaner()
    request = RunCreate(
        project=project,
        run_id=external,
        name=cleaner.name(name) if name is not None else None,
        config=cleaner.config(config) if config is not None else None,
        tags=cleaner.tags(tags) if tags is not None else None,
        resume=resume,
        fork_run_id=str(fork_run_id) if fork_run_id is not None else None,
        fork_step=fork_step,
        inherit_config=True if inherit_config is None else inherit_config,
        inherit_tags=False if inherit_tags is None else inherit_tags,
    )
    cleaner.warn()
    if fork_checkpoint:
        # Before the run exists: no checkpoint to fork is an error that creates nothing.
        checkpoints.find_checkpoint(str(fork_run_id), not_after_step=fork_step, project=project,
                                    **_direct(resolved))
    session = uuid.uuid4().hex
    transport: Transport
    if resolved.sidecar_socket:
        sidecar = SidecarTransport(resolved.sidecar_socket, session=session,
                                   writer=resolved.writer, timeout=resolved.http_timeout,
                                   node_rank=resolved.node_rank,
                                   gpus=GpuLookup.for_this_process())
        transport = sidecar
    else:
        transport = HttpTransport(resolved.url, resolved.api_key, resolved.http_timeout)
    try:
        info = transport.open_run(request, resolved.init_timeout)
    except BaseException:
        transport.close()
        raise
    if info.resumed and request.name is not None and request.name != info.name:
        warnings.warn(
            f"pluto: run {info.display_id} already exists as {info.name!r}; the name {name!r} "
            "given here is ignored", RuntimeWarning, stacklevel=2,
        )
    if resume and info.last_step is not None:
        first_step = info.last_step + 1
    elif info.fork_step is not None:
        first_step = info.fork_step + 1
    else:
        first_step = 0
    pipeline = Pipeline(
        run_id=info.id,
        writer=resolved.writer,
        transport=transport,
        spool_root=Path(root) / "spool",
        flush_interval=resolved.flush_interval,
        max_chunk_points=resolved.max_chunk_points,
        max_buffered_calls=resolved.max_buffered_calls,
        # Through a sidecar, its spool is the durable one; ours only bridges reconnects.
        fsync=resolved.fsync and not resolved.sidecar_socket,
        session=session,
        # The run's own external id once known: the caller may have resumed it by its
        # display or numeric id.
        run_ref=(project, info.run_id or external) if resolved.sidecar_socket else None,
    )
    run = Run(info, settings=resolved, transport=transport, pipeline=pipeline,
              first_step=first_step)
    if resolved.sidecar_socket:
        sidecar.on_resolved(run._resolved)
    if resolved.console:
        run._start_console()
    with _lock:
        _runs.append(run)
    _install_hooks()
    if fork_checkpoint:
        try:
            copied = checkpoints.fork_checkpoint(run, str(fork_run_id), from_project=project,
                                                 not_after_step=fork_step, **_direct(resolved))
            with checkpoints.client_for(resolved) as client:
                run.checkpoint_path = checkpoints.download(client, copied)
        except BaseException:
            run.finish(status=RunStatus.FAILED)
            raise
    return run


def _check_spool_root(spool: Path) -> None:
    """``ValueError`` naming ``dir`` / ``PLUTO_DIR`` when the local spool cannot live there:
    found after the run was opened, it was an ``OSError`` that left an empty run RUNNING."""
    # Made, and left (empty) when the run is not opened after all: taken away again, it
    # could vanish under another rank that shares the dir and is making its session there.
    try:
        spool.mkdir(parents=True, exist_ok=True)
        if not os.access(spool, os.W_OK | os.X_OK):
            raise PermissionError(f"{spool} is not writable")
    except OSError as exc:
        raise ValueError(f"dir= (or PLUTO_DIR) {str(spool.parent)!r} cannot hold pluto's local "
                         f"spool: {exc.strerror or exc}; point it at a writable directory"
                         ) from None


def _direct(settings: Settings) -> dict[str, Any]:
    """Connection arguments of the module-level calls: the sidecar's API socket when
    these settings have a sidecar, else their server and key."""
    return {"settings": settings}


def current() -> Run | None:
    """The newest run of this process that is not finished."""
    with _lock:
        return _runs[-1] if _runs else None


def _forked_off() -> None:
    """In a child of ``os.fork()``: this process's copies of the runs send nothing. They stay
    listed, so that ``pluto.log()`` there says why, not "before pluto.init()"."""
    for run in _runs:
        run.forked_off()


os.register_at_fork(after_in_child=_forked_off)


def forget(run: Run) -> None:
    with _lock:
        if run in _runs:
            _runs.remove(run)


def log(data: Mapping[str, Any], step: int | None = None,
        timestamp: float | None = None) -> None:
    run = current()
    if run is None:
        when = ("after every run of this process finished" if _hooks_installed
                else "before pluto.init()")
        warnings.warn(f"pluto.log() {when}: nothing was logged; start a run with "
                      "pluto.init()", RuntimeWarning, stacklevel=2)
        return
    run.log(data, step=step, timestamp=timestamp)


def finish(code: int | None = None) -> None:
    run = current()
    if run is not None:
        run.finish(code)


def _install_hooks() -> None:
    """At exit, finish open runs: FAILED after an uncaught exception, else COMPLETED."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException,
                   tb: TracebackType | None) -> None:
        _uncaught.append(kind)
        previous(kind, value, tb)

    sys.excepthook = excepthook
    atexit.register(_finish_all)


def _finish_all() -> None:
    status = RunStatus.COMPLETED
    if _uncaught:
        interrupted = all(issubclass(kind, KeyboardInterrupt) for kind in _uncaught)
        status = RunStatus.TERMINATED if interrupted else RunStatus.FAILED
    for run in list(_runs):
        run.finish(status=status)
