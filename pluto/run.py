"""``Run``: what ``pluto.init()`` returns."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from pluto import checkpoints
from pluto.console import ConsoleCapture
from pluto.merge import deep_merge, union_tags
from pluto.pipeline import Pipeline
from pluto.settings import Settings
from pluto.transport.base import Transport
from pluto.values import (
    MetadataCleaner,
    ValueConverter,
    finite_time,
    key_problem,
)
from pluto.wire import (
    MAX_STEP,
    CheckpointInfo,
    CheckpointList,
    FileInfo,
    FileList,
    RunAttached,
    RunStatus,
    RunUpdate,
)

log = logging.getLogger("pluto")

#: Keys found valid are remembered (up to this many) so ``log()`` checks each key once.
MAX_CHECKED_KEYS = 100_000


#: Exit codes of a process stopped by SIGINT or SIGTERM (128 + the signal's number), as a
#: handler passes them to ``sys.exit``: the run is TERMINATED, not FAILED.
STOPPED_BY_SIGNAL = (128 + 2, 128 + 15)

FORKED_OFF = ("log() in a process forked from the one that called pluto.init() (a "
              "multiprocessing or DataLoader worker) is not delivered: log from the process "
              "that called init(), or call pluto.init() here with the same run id "
              "(PLUTO_RUN_ID) and a RANK of its own")


class Run:
    """One process's handle on a run. Every rank of a job holds its own ``Run``
    for the same shared run; ``log()`` never blocks on I/O."""

    def __init__(
        self,
        info: RunAttached,
        *,
        settings: Settings,
        transport: Transport,
        pipeline: Pipeline,
        first_step: int,
    ) -> None:
        self._info = info
        self.settings = settings
        self._transport = transport
        self._pipeline = pipeline
        self._rows = pipeline.rows
        self._limit = pipeline.max_buffered_calls
        self._converter = ValueConverter()
        self._good_keys: set[str] = set()
        self._step = first_step - 1
        self._finished = False
        #: This process is a fork of the one that started the run (see ``forked_off``).
        self._forked_off = False
        self._finish_lock = threading.Lock()
        self._console: ConsoleCapture | None = None
        self._warned_log_errors: set[str] = set()
        self.undelivered_bytes = 0
        #: Where ``init(..., fork_checkpoint=True)`` put the forked checkpoint's files.
        self.checkpoint_path: Path | None = None

    # -- identity -------------------------------------------------------------

    @property
    def id(self) -> int:
        """The server's numeric run id (0 while a sidecar waits for the server)."""
        return self._info.id

    @property
    def pending(self) -> bool:
        """True while the server has not answered yet (sidecar mode, server down at init)."""
        return self._info.id == 0

    @property
    def run_id(self) -> str | None:
        """The external id shared by every rank (``PLUTO_RUN_ID``)."""
        return self._info.run_id

    @property
    def display_id(self) -> str:
        return self._info.display_id

    @property
    def _label(self) -> str:
        """The run in messages: its display id, or its run id while it is pending."""
        return self._info.display_id or repr(self._info.run_id)

    @property
    def resumed(self) -> bool:
        """False for the one process that created the run, True for every other."""
        return self._info.resumed

    @property
    def fork_run_id(self) -> int | None:
        """The parent as resolved by the server: the ancestor that owns ``fork_step``."""
        return self._info.forked_from

    @property
    def fork_step(self) -> int | None:
        return self._info.fork_step

    @property
    def url(self) -> str:
        return self._info.url

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def project(self) -> str:
        return self._info.project

    @property
    def config(self) -> dict[str, Any]:
        return self._info.config

    @property
    def tags(self) -> list[str]:
        return list(self._info.tags)

    @property
    def step(self) -> int:
        """The step of the last ``log()`` call (-1 before the first)."""
        return self._step

    @property
    def finished(self) -> bool:
        return self._finished

    def forked_off(self) -> None:
        """Called in a child made by ``os.fork()`` (a multiprocessing or DataLoader worker with
        the fork start method): the run's sender thread and spool are the parent's, so this
        copy of the run is closed here. ``log()`` says so once instead of queueing points
        that nothing would ever send, and ``finish()`` does nothing (the parent finishes)."""
        self._forked_off = True
        self._finished = True
        self._console = None  # its reader threads are the parent's

    @property
    def writer(self) -> int:
        return self._pipeline.writer

    # -- logging --------------------------------------------------------------

    def log(self, data: Mapping[str, Any], step: int | None = None,
            timestamp: float | None = None) -> None:
        """Queue ``data`` at ``step`` (default: the previous step + 1) and return.

        Never does I/O here. Values that are not numbers are skipped with one
        warning per key.
        """
        try:
            if self._finished:
                if self._forked_off:
                    self._warn_once("forked", FORKED_OFF)
                else:
                    self._warn_once("after finish", "log() after finish() is ignored; start "
                                    "a new run with init()")
                return
            if step is None:
                step = self._step + 1
            elif type(step) is not int:
                raw: Any = step
                if isinstance(raw, float) and not raw.is_integer():
                    self._warn_once("fractional step", f"log() needs a whole-number step, "
                                    f"got {step!r}; this call was skipped")
                    return
                step = int(step)
            # Checked here, not by the server: a step beyond 64 bits used to reach the sender
            # thread, where it failed the whole chunk (every valid point packed with it lost).
            if not 0 <= step <= MAX_STEP:
                self._warn_once("step range", f"log() needs a step between 0 and "
                                f"2**63-1, got {step}; this call was skipped")
                return
            if timestamp is None:
                at = time.time()
            elif type(timestamp) is float and timestamp - timestamp == 0.0:  # finite: fast path
                at = timestamp
            else:
                # A timestamp that is not a finite number (a string, NaN) failed the chunk in the
                # sender thread too; the points are kept, at the current time.
                checked = finite_time(timestamp)
                if checked is None:
                    self._warn_once("timestamp", f"log() got timestamp {timestamp!r}, not "
                                    "a finite number of seconds; the current time is used")
                    checked = time.time()
                at = checked
            values: dict[str, float] = {}
            convert = self._converter.convert
            good = self._good_keys
            for key, value in data.items():
                if type(key) is not str:
                    try:
                        key = str(key)
                    except Exception as exc:  # a key object whose __str__ raises
                        self._warn_once("key str",
                                        f"log() skipped a key whose str() failed: {exc!r}")
                        continue
                if key not in good:
                    problem = key_problem(key)
                    if problem is not None:
                        self._converter.reject_key(key, problem)
                        continue
                    if len(good) < MAX_CHECKED_KEYS:
                        good.add(key)
                if type(value) is float:
                    values[key] = value
                else:
                    converted = convert(key, value)
                    if converted is not None:
                        values[key] = converted
            if len(self._rows) >= self._limit:
                self._pipeline.wait_for_room()
            self._rows.append((step, at, values))
            self._step = step  # only now: a call that was skipped takes no step
        except Exception as exc:  # never crash the training loop
            self._warn_once(type(exc).__name__, f"log() failed and skipped this call: {exc!r}")

    def _warn_once(self, kind: str, message: str) -> None:
        """One warning per kind of mistake: the first of each, not only the first of all
        (a later, different mistake was skipped in silence)."""
        if kind not in self._warned_log_errors:
            self._warned_log_errors.add(kind)
            warnings.warn(f"pluto: {message}", RuntimeWarning, stacklevel=3)

    # -- metadata -------------------------------------------------------------

    # Metadata is made storable as in init() (values.MetadataCleaner), with a warning.
    def add_tags(self, tags: str | Iterable[str]) -> None:
        cleaner = MetadataCleaner()
        self._update(RunUpdate(add_tags=cleaner.tags(tags)), cleaner)

    def remove_tags(self, tags: str | Iterable[str]) -> None:
        cleaner = MetadataCleaner()
        self._update(RunUpdate(remove_tags=cleaner.tags(tags)), cleaner)

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Deep-merge ``config`` into the run's config (new keys win)."""
        cleaner = MetadataCleaner()
        self._update(RunUpdate(config=cleaner.config(config)), cleaner)

    def _update(self, request: RunUpdate, cleaner: MetadataCleaner) -> None:
        cleaner.warn(stacklevel=4)
        try:
            info = self._transport.update_run(self.id, request)
        except Exception as exc:
            warnings.warn(f"pluto: could not update run {self.display_id or self.run_id}: "
                          f"{exc}", RuntimeWarning, stacklevel=3)
            return
        if info is not None:
            self._info.config = info.config
            self._info.tags = info.tags
            return
        # Queued by the sidecar: apply the same rule here so this process sees it now.
        if request.config:
            self._info.config = deep_merge(self._info.config, request.config)
        tags = union_tags(self._info.tags, request.add_tags or [])
        removed = set(request.remove_tags or [])
        self._info.tags = [tag for tag in tags if tag not in removed]

    def _resolved(self, info: RunAttached) -> None:
        """The sidecar reports the server's answer for a run that was pending at init."""
        self._info = info
        self._pipeline.run_id = info.id

    # -- checkpoints and files ----------------------------------------------------

    @property
    def _api_ref(self) -> str:
        """How the server API names this run (with ``project``), even while pending: its
        numeric id once known (an all-digit external id would name the run with that
        numeric id first), else its external id."""
        if self._info.id:
            return str(self._info.id)
        return self._info.run_id or self.display_id

    def _checkpoint_step(self, step: int | None) -> int:
        if step is None:
            return max(self._step, 0)
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return step

    def log_checkpoint(self, path: str | os.PathLike[str], step: int | None = None,
                       metadata: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
        """Upload a file or a directory (structure kept) as the checkpoint at ``step``
        (default: the current step). Blocks until it is stored; returns it, or None
        after a warning when it could not be (training carries on)."""
        try:
            at = self._checkpoint_step(step)
            with checkpoints.client_for(self.settings) as client:
                return checkpoints.log_checkpoint(client, self._api_ref, self.project,
                                                  Path(path), at, dict(metadata or {}))
        except Exception as exc:
            warnings.warn(f"pluto: checkpoint {path} was not saved: {exc}", RuntimeWarning,
                          stacklevel=2)
            return None

    def save_checkpoint(self, obj: Any, step: int | None = None,
                        metadata: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
        """``torch.save`` a state dict, module, optimizer or a dict of them (modules and
        optimizers as their state dicts) as the checkpoint at ``step``; load it back with
        ``pluto.load_checkpoint``. Warns and returns None on failure."""
        try:
            at = self._checkpoint_step(step)
            with checkpoints.client_for(self.settings) as client:
                return checkpoints.save_checkpoint(client, self._api_ref, self.project, obj,
                                                   at, dict(metadata or {}))
        except Exception as exc:
            said = step if step is not None else f"{max(self._step, 0)} (the current step)"
            warnings.warn(f"pluto: checkpoint at step {said} was not saved: {exc}",
                          RuntimeWarning, stacklevel=2)
            return None

    def log_file(self, path: str | os.PathLike[str], name: str | None = None,
                 step: int | None = None) -> FileInfo | None:
        """Attach any file (a plot, a config, samples) to the run under ``name``
        (default: its file name). Forks do not inherit files. Warns on failure."""
        try:
            with checkpoints.client_for(self.settings) as client:
                return checkpoints.log_file(client, self._api_ref, self.project, Path(path),
                                            name, step)
        except Exception as exc:
            warnings.warn(f"pluto: file {path} was not saved: {exc}", RuntimeWarning,
                          stacklevel=2)
            return None

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """This run's checkpoints by step, forked ones with their source."""
        with checkpoints.client_for(self.settings) as client:
            return client.call("GET", f"/runs/{self._api_ref}/checkpoints", CheckpointList,
                               params={"project": self.project}).checkpoints

    @property
    def files(self) -> list[FileInfo]:
        with checkpoints.client_for(self.settings) as client:
            return client.call("GET", f"/runs/{self._api_ref}/files", FileList,
                               params={"project": self.project}).files

    def download_checkpoint(self, step: int | None = None,
                            dest: str | os.PathLike[str] | None = None) -> Path:
        """Fetch the checkpoint at ``step`` (newest when None) into ``dest``; its path."""
        with checkpoints.client_for(self.settings) as client:
            params: dict[str, Any] = {"project": self.project}
            if step is not None:
                params["step"] = step
            info = client.call("GET", f"/runs/{self._api_ref}/checkpoints/resolve",
                               CheckpointInfo, params=params)
            return checkpoints.download(client, info, Path(dest) if dest is not None else None)

    # -- console ----------------------------------------------------------------

    def _start_console(self) -> None:
        logs = self._pipeline.logs
        try:
            self._console = ConsoleCapture(logs.append)
        except OSError as exc:
            warnings.warn(f"pluto: console capture is off: {exc}", RuntimeWarning, stacklevel=2)

    # -- finishing --------------------------------------------------------------

    def finish(self, code: int | None = None, *, status: RunStatus | str | None = None,
               timeout: float | None = None) -> None:
        """Deliver what was logged (bounded by ``finish_timeout``) and close the run.

        ``code`` 0 or None means COMPLETED, anything else FAILED; ``status`` names
        one directly. Anything not delivered in time stays in the local spool and
        is sent by the next ``init()`` that uses the same ``dir``.
        """
        with self._finish_lock:
            if self._finished:
                return
            self._finished = True
        final = RunStatus(status) if status is not None else (
            RunStatus.COMPLETED if not code else RunStatus.FAILED
        )
        try:
            if self._console is not None:
                self._console.stop()
                self._console = None
            # The status rides in the spool behind the data: it is set when the data lands.
            self._pipeline.finish(final)
            delivered = self._pipeline.close(
                self.settings.finish_timeout if timeout is None else timeout
            )
            if not delivered:
                self.undelivered_bytes = self._pipeline.pending_bytes
                reason = self._pipeline.state.last_error or "timed out"
                directory = self._pipeline.spool.directory
                in_memory = self._pipeline.unwritten_bytes
                # What waited in memory for room on a full volume is not in the spool: say
                # so, rather than promise that the next init() sends it.
                lost = (f"; {in_memory} of them were still waiting in memory for room on the "
                        f"full volume of {directory} and are lost when this process exits"
                        if in_memory else "")
                warnings.warn(
                    f"pluto: finish() could not deliver {self.undelivered_bytes} bytes of data "
                    f"for run {self._label} ({reason}); what is in {directory} will be "
                    f"sent, and the run marked {final.value}, by the next pluto.init() with the "
                    f"same dir{lost}",
                    RuntimeWarning, stacklevel=2,
                )
        except Exception as exc:
            warnings.warn(f"pluto: could not mark run {self._label} {final.value}: {exc}",
                          RuntimeWarning, stacklevel=2)
        finally:
            self._transport.close()
            from pluto import sdk

            sdk.forget(self)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.finish()
        elif issubclass(kind, KeyboardInterrupt):
            self.finish(status=RunStatus.TERMINATED)
        elif isinstance(exc, SystemExit) and exc.code in (0, None):
            self.finish()  # sys.exit() or sys.exit(0): the script ended well
        elif isinstance(exc, SystemExit) and exc.code in STOPPED_BY_SIGNAL:
            self.finish(status=RunStatus.TERMINATED)  # e.g. a SIGTERM handler's sys.exit(143)
        else:
            self.finish(status=RunStatus.FAILED)

    def __repr__(self) -> str:
        return f"<pluto.Run {self.display_id} {self.name!r} project={self.project!r}>"
