"""The sidecar: owns the socket, the durable queue, the forwarder and the run registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from pluto.credentials import ApiKey
from pluto.errors import RequestRejected, ServerUnavailable
from pluto.spool import Position
from pluto.wire import Chunk, RunCreate, RunOpened, encode_msgpack
from pluto_sidecar import __version__
from pluto_sidecar.buffers import FramePool
from pluto_sidecar.connection import ClientError, Connection
from pluto_sidecar.forwarder import Forwarder
from pluto_sidecar.health import HealthServer
from pluto_sidecar.logs import log_event
from pluto_sidecar.pod_gpus import PodGpus
from pluto_sidecar.proxy import ApiProxy
from pluto_sidecar.queue import DurableQueue, RecordKind
from pluto_sidecar.registry import Listener, RunEntry, RunRegistry, as_resumed
from pluto_sidecar.settings import SidecarSettings
from pluto_sidecar.stream import FrameStream, ReceiveBudget
from pluto_sidecar.sysmetrics import SystemSampler
from pluto_sidecar.telemetry import Telemetry
from pluto_sidecar.upstream import Upstream

log = logging.getLogger("pluto.sidecar")


class CannotStart(RuntimeError):
    """The sidecar cannot start as configured; the message names the flag to change."""


class SocketInUse(CannotStart):
    """Another live sidecar listens on the socket: never steal it."""


class Sidecar:
    version = __version__

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.telemetry = Telemetry()
        self.registry = RunRegistry()
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self.queue = DurableQueue(settings.spool_dir / "queue", settings.spool_max_bytes)
        self.receive_budget = ReceiveBudget(settings.receive_budget_bytes)
        # As many bytes of buffers kept for big frames as may be received at once.
        self.frame_pool = FramePool(settings.receive_budget_bytes)
        api_key = ApiKey(settings.api_key, settings.api_key_file)
        self.upstream = Upstream(settings.server, api_key, compression=settings.compression)
        self.forwarder = Forwarder(
            self.queue, self.upstream, self.registry, self.telemetry,
            batch_max_bytes=settings.batch_max_bytes, batch_max_age=settings.batch_max_age,
            dead_letter=settings.spool_dir / "dead-letter.msgpack",
        )
        #: The HTTP proxy of the server API on its own socket, when one is configured.
        self.proxy = (None if settings.api_socket is None else
                      ApiProxy(settings.api_socket, settings.server, api_key,
                               self.telemetry))
        self.health = HealthServer(settings.health_host, settings.health_port, self.telemetry,
                                   self._ready)
        # Computed when scraped, so they are current even while the forwarder sleeps.
        self.telemetry.spool_bytes.set_function(lambda: self.queue.pending_bytes)
        self.telemetry.spool_volume_full.set_function(lambda: self.queue.volume_full)
        self.telemetry.oldest_unsent_age_seconds.set_function(
            lambda: self.queue.oldest_unsent_age)
        self.telemetry.runs_pending.set_function(lambda: self.registry.pending_count)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        #: Since when no client is connected, after at least one was (None: never, or now).
        self._idle_since: float | None = None
        self._sys_session = uuid.uuid4().hex
        self._sys_seq = 0
        #: The label of this node's system metrics: ``--node-rank`` until a rank says better.
        self.node_rank = settings.node_rank
        #: The pod's GPUs as its ranks tell them: what the system metrics report.
        self.pod_gpus = PodGpus()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        records, cut = self.queue.recovery
        log_event(log, "spool opened", directory=str(self.settings.spool_dir),
                  unsent_records=records, torn_bytes_cut=cut)
        if cut:
            log_event(log, "spool had a torn tail from a crash; it was cut, intact records "
                      "kept", torn_bytes_cut=cut, level=logging.WARNING)
        # Both paths are checked before either is bound: a live sidecar on one of them means
        # this one must not start, and must not have taken the other meanwhile.
        _claim_socket_path(self.settings.socket)
        if self.proxy is not None:
            _claim_socket_path(self.proxy.path)
        self.queue.start()
        try:
            await self._bind()
        except BaseException:
            await self._abandon_start()
            raise
        self._tasks.append(asyncio.create_task(self.forwarder.run_forever(), name="forwarder"))
        if self.settings.sys_interval > 0:
            self._tasks.append(asyncio.create_task(self._sample_system(), name="sysmetrics"))
        log_event(log, "sidecar ready", socket=str(self.settings.socket),
                  api_socket=str(self.proxy.path) if self.proxy is not None else None,
                  server=self.settings.server, health_port=self.health.port)

    async def stop(self, *, drain_seconds: float | None = None) -> bool:
        """Stop accepting, forward what is spooled within the deadline, then close.

        The API socket keeps serving until then: a rank that saves a last checkpoint when the
        pod is told to stop (every container gets SIGTERM at once) can upload it, and
        requests still in flight are given the rest of the deadline before they are cut.

        Returns True when everything was delivered; what was not stays spooled.
        """
        deadline = time.monotonic() + (self.settings.drain_seconds if drain_seconds is None
                                       else drain_seconds)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.settings.socket.unlink()
        for task in self._tasks:
            if task.get_name() != "forwarder":
                task.cancel()
        self.forwarder.batch_max_age = 0.0  # no reason to wait for fuller batches now
        # Keep forwarding while ranks still connected send their last frames, and proxying
        # while API requests (an upload) are under way.
        while time.monotonic() < deadline and (self._connections or not self.queue.empty
                                               or self._api_in_flight):
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        delivered = self.queue.empty or await self.forwarder.drain(deadline)
        for connection in list(self._connections):
            connection.cancel()
        if self.proxy is not None:
            await self.proxy.stop(deadline)
        log_event(log, "sidecar stopped", delivered=delivered,
                  left_in_spool_bytes=self.queue.pending_bytes)
        await self.queue.stop()
        await self.upstream.close()
        self.health.stop()
        return delivered

    async def _bind(self) -> None:
        """Listen on the sockets and the health port; ``CannotStart`` names what to fix."""
        settings = self.settings
        try:
            self._server = await self._listen()
        except OSError as exc:
            raise CannotStart(f"--socket {settings.socket}: cannot listen there "
                              f"({exc.strerror or exc}); give a path in a writable "
                              "directory") from exc
        if self.proxy is not None:
            try:
                await self.proxy.start()
            except OSError as exc:
                raise CannotStart(f"--api-socket {self.proxy.path}: cannot listen there "
                                  f"({exc.strerror or exc}); give another path, or "
                                  "--api-socket '' for none") from exc
        try:
            self.health.start()
        except OSError as exc:
            raise CannotStart(f"--health-port {settings.health_port} on --health-host "
                              f"{settings.health_host}: {exc.strerror or exc}; choose a free "
                              "port (0: any free port)") from exc

    async def _abandon_start(self) -> None:
        """A start that failed half-way: close and remove what it opened, so that no
        socket file is left for clients to find with nobody behind it."""
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.settings.socket.unlink()
        if self.proxy is not None:
            await self.proxy.stop()
        self.health.stop()
        await self.queue.stop()
        await self.upstream.close()

    @property
    def _api_in_flight(self) -> int:
        return 0 if self.proxy is None else self.proxy.in_flight

    async def _listen(self) -> asyncio.base_events.Server:
        path = self.settings.socket
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: FrameStream(self._accept), path=str(path))
        os.chmod(path, 0o660)  # the pod's containers share a group; nobody else writes
        return server

    async def _accept(self, stream: FrameStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._idle_since = None
        self.pod_gpus.client_connected()
        try:
            await Connection(self, stream).serve()
        finally:
            self._connections.discard(task)
            if not self._connections:
                self._idle_since = time.monotonic()

    @property
    def idle_seconds(self) -> float | None:
        """How long the last client has been gone; None before the first, while one is on,
        or while a request on the API socket (a last checkpoint upload) is under way."""
        if self._idle_since is None or self._api_in_flight:
            return None
        return time.monotonic() - self._idle_since

    def _ready(self) -> tuple[bool, str]:
        if self._server is None or not self._server.is_serving():
            return False, "the socket is not listening"
        if not self.settings.socket.is_socket():
            return False, f"the socket {self.settings.socket} is gone (ranks cannot find it)"
        if self.proxy is not None and not self.proxy.listening:
            return False, f"the API socket {self.proxy.path} is not listening"
        if not os.access(self.settings.spool_dir, os.W_OK):
            return False, f"the spool directory {self.settings.spool_dir} is not writable"
        return True, "ready"

    # -- runs -----------------------------------------------------------------

    async def open_run(self, request: RunCreate, listener: Listener) -> RunOpened:
        """Attach once per run per sidecar; answer "pending" if the server is away.

        The ranks of one job share one server answer: an open is answered from the cache
        while other clients of the run are on (see ``RunRegistry``), when it is a plain
        attach or asks what the cached answer was fetched for. Anything else asks the
        server again: a process that opens the run after its clients all left (a
        restart), whose ``resume=True`` needs the run's current last step, and a fork or
        resume open to a run the cache knows from another kind of open.
        """
        if not request.run_id:
            raise ClientError("OPEN_RUN needs run_id (the SDK always sends one)")
        key = (request.project, request.run_id)
        entry = self.registry.entry(key)
        async with entry.lock:
            if entry.pending is not None:  # an OPEN waits in the spool: share its answer
                self.registry.subscribe(key, listener)
                self.registry.attach(key, listener)
                return RunOpened(project=key[0], run_ref=key[1],
                                 pending=_pending_detail(entry.pending, request))
            if entry.info is not None and _cached_answer_holds(entry, request):
                info = entry.info
                if entry.handed_out and not info.resumed:
                    info = as_resumed(info)
                entry.handed_out = True
                self.registry.attach(key, listener)
                return RunOpened(project=key[0], run_ref=key[1], run=info)
            if entry.failed is not None:
                raise ClientError(entry.failed)
            wait = self.settings.open_wait
            if request.resume:
                # The run's last step counts only what reached the server: let what this
                # sidecar holds (a previous attempt's last chunks) get there first, within
                # the same wait (and half of it left at least for the open itself).
                started = time.monotonic()
                await self._delivered(self.queue.spool.end, wait)
                wait = max(wait / 2, wait - (time.monotonic() - started))
            try:
                info = await asyncio.wait_for(self.upstream.open_run(request), wait)
            except RequestRejected as exc:
                if exc.data_refused:
                    raise
                # A refused key (401) is the sidecar's to fix, not the training code's: the
                # open waits in the spool like everything else until the key is accepted.
                why = "the server refuses the sidecar's API key"
                reason = f"{why} (fix the sidecar's Secret): {exc}"
            except (ServerUnavailable, TimeoutError) as exc:
                reason = str(exc) or "the server did not answer in time"
                why = "server unavailable"
            else:
                self.registry.resolve(key, info, request)
                entry.handed_out = True
                self.registry.attach(key, listener)
                return RunOpened(project=key[0], run_ref=key[1], run=info)
            # Keep the request durably: the forwarder opens the run when it can.
            ticket = self.queue.append(RecordKind.OPEN, encode_msgpack(request))
            await self.queue.durable(ticket)
            entry.pending = reason
            pending = _pending_detail(reason, request)
            log_event(log, f"run pending: {why}", project=key[0], run_ref=key[1],
                      reason=pending, resume=request.resume, level=logging.WARNING)
            self.registry.subscribe(key, listener)
            self.registry.attach(key, listener)
            return RunOpened(project=key[0], run_ref=key[1], pending=pending)

    async def _delivered(self, position: Position, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the server has acknowledged the spool
        up to ``position``; False when it has not by then."""
        deadline = time.monotonic() + timeout
        spool = self.queue.spool
        while not spool.empty and spool.acked < position:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- system metrics -------------------------------------------------------

    def use_node_rank(self, node_rank: int) -> None:
        """A rank told its node's rank (torchrun's ``GROUP_RANK``): the label of this node's
        system metrics from now on. It beats ``--node-rank`` / ``PLUTO_NODE_RANK``, which the
        operator can only derive from the pod (its completion index: wrong for a JobSet whose
        Jobs repeat indexes, absent for pods outside an Indexed Job)."""
        if node_rank != self.node_rank:
            log_event(log, "node rank told by a rank", node_rank=node_rank,
                      previous=self.node_rank)
            self.node_rank = node_rank

    def use_gpus(self, uuids: list[str]) -> None:
        """A rank told the UUIDs of its container's GPUs (maybe none): the system metrics
        report the pod's GPUs (those told by all its ranks), not the node's."""
        first = not self.pod_gpus.told
        new = self.pod_gpus.tell(uuids)
        if new or first:
            log_event(log, "GPUs told by a rank", gpus=new,
                      pod_gpus=len(self.pod_gpus.uuids))

    async def _sample_system(self) -> None:
        sampler = SystemSampler(self.settings.spool_dir)
        unseen: set[str] = set()  # told GPUs the sidecar cannot see, already reported
        try:
            while True:
                await asyncio.sleep(self.settings.sys_interval)
                missing = set(sampler.restrict_gpus(self.pod_gpus.which())) - unseen
                if missing:
                    unseen |= missing
                    log_event(log, "the ranks use GPUs this sidecar cannot see: no "
                              "metrics for them (the sidecar container needs "
                              "NVIDIA_VISIBLE_DEVICES=all and the NVIDIA runtime)",
                              gpus=sorted(missing), level=logging.WARNING)
                values = await asyncio.to_thread(sampler.sample)
                self._log_system(values)
        finally:
            sampler.close()

    def _log_system(self, values: dict[str, float]) -> None:
        """One chunk per run this node logs to, writer = the node rank, step = unix time."""
        if not values:
            return
        now = time.time()
        keys = list(values)
        for project, run_ref in self.registry.active():
            chunk = Chunk(run=0, project=project, run_ref=run_ref, session=self._sys_session,
                          seq=self._sys_seq, writer=self.node_rank, keys=keys,
                          key_index=list(range(len(keys))), steps=[int(now)] * len(keys),
                          values=[values[k] for k in keys], times=[now] * len(keys))
            self._sys_seq += 1
            self.queue.append(RecordKind.CHUNK, encode_msgpack(chunk))


def _shape(request: RunCreate) -> tuple[object, ...]:
    """What of an open decides which answer it needs (config, tags and name do not)."""
    return (request.resume, request.fork_run_id, request.fork_step, request.inherit_config,
            request.inherit_tags)


def _cached_answer_holds(entry: RunEntry, request: RunCreate) -> bool:
    """Whether the cached answer is the one the server would give ``request`` now."""
    if not entry.clients:
        return False  # everybody who opened it left: a restart, not a rank of the same job
    if entry.answered is not None and _shape(entry.answered) == _shape(request):
        return True
    return not request.resume and request.fork_run_id is None  # a plain attach


def _pending_detail(reason: str, request: RunCreate) -> str:
    """Why a run is pending, and, for ``resume=True``, what that means for its steps."""
    if not request.resume:
        return reason
    return (f"{reason}; resume=True cannot learn the run's last step until the server "
            "answers, so this process's steps start again from "
            f"{0 if request.fork_step is None else request.fork_step + 1} and may repeat "
            "steps the run already has")


def _claim_socket_path(path: Path) -> None:
    """Make ``path`` free to bind: replace a stale socket file, never a live socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if _socket_alive(path):
            raise SocketInUse(f"another sidecar is listening on {path}; not taking it over")
        path.unlink()  # left by a crashed sidecar
        log_event(log, "replaced a stale socket file", socket=str(path))


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
