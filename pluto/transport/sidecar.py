"""Sidecar transport: the SDK talks to the pod's sidecar over a Unix socket.

The training process needs no credentials and no route to the server. Calls are
request/reply frames (``pluto.wire``); the sidecar may also push a RUN frame when
a run that was pending (server away at ``init``) becomes known. Any socket error
is "unavailable": the pipeline backs off, reconnects and resends what was not
acknowledged, and the server applies each chunk once, so a resend is harmless.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from pluto.digits import parse_digits
from pluto.errors import RequestRejected, ServerUnavailable
from pluto.gpus import GpuLookup
from pluto.transport.base import Transport
from pluto.wire import (
    FEATURE_NODE,
    FRAME_HEADER,
    PROTOCOL_VERSION,
    Ack,
    FrameError,
    FrameFormatError,
    FrameKind,
    Hello,
    IngestResult,
    NodeInfo,
    RunAttached,
    RunCreate,
    RunInfo,
    RunOpened,
    RunStatus,
    RunUpdate,
    RunUpdateRequest,
    Welcome,
    encode_frame,
    encode_msgpack,
    frame_header,
    parse_frame_header,
)

T = TypeVar("T")
Resolved = Callable[[RunAttached], None]


class SidecarTransport(Transport):
    def __init__(self, path: str, *, session: str, writer: int, timeout: float = 30.0,
                 node_rank: int | None = None, gpus: GpuLookup | None = None) -> None:
        self.path = path
        self.session = session
        self.writer = writer
        self.node_rank = node_rank
        self.gpus = gpus
        self._takes_node = False  # the sidecar's Welcome lists FEATURE_NODE
        self._told_gpus = False  # the NODE frame on this connection had the lookup's answer
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self._next_id = 1
        self._request: RunCreate | None = None
        self._on_resolved: Resolved | None = None
        self._max_frame = 0
        self._opened = False
        self.run_key: tuple[str, str] | None = None

    # -- connection -------------------------------------------------------------

    def _connection(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise ServerUnavailable(
                f"cannot reach the pluto sidecar at {self.path}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        try:
            welcome = self._call(FrameKind.HELLO, Hello(
                protocol=PROTOCOL_VERSION, session=self.session, writer=self.writer,
                pid=os.getpid()), FrameKind.WELCOME, Welcome)
            self._max_frame = welcome.max_frame_bytes
            self._takes_node = FEATURE_NODE in welcome.features
            self._told_gpus = False
            self._tell_node()
            if self._opened:  # a reconnect (perhaps a new sidecar process): open again
                self._reopen()
        except BaseException:
            self._drop()
            raise
        return sock

    def _tell_node(self) -> None:
        """Send the sidecar what this process knows of its node (a NODE frame, not answered),
        if the sidecar takes one: an older sidecar would refuse a frame kind it does not know.
        The GPUs may be known only later (``GpuLookup``): ``deliver`` calls again until they
        have been told on this connection. An empty list is told too: it means this
        container has no GPUs, so the sidecar must not report the node's."""
        lookup_done = self.gpus is None or self.gpus.done
        self._told_gpus = lookup_done or not self._takes_node
        if not self._takes_node:
            return
        gpus = self.gpus.result() if self.gpus is not None else None
        node_rank = self.node_rank if self.node_rank is not None and self.node_rank >= 0 else None
        if node_rank is not None or gpus is not None:
            self._send(FrameKind.NODE, NodeInfo(node_rank=node_rank, gpus=gpus))

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _reopen(self) -> None:
        assert self._request is not None
        opened = self._call(FrameKind.OPEN_RUN, self._request, FrameKind.RUN, RunOpened)
        self._handle_opened(opened)

    # -- frames ---------------------------------------------------------------

    def _new_request_id(self) -> int:
        request_id = self._next_id
        self._next_id = (self._next_id % 0xFFFFFFFF) + 1  # u32 on the wire; 0 means "pushed"
        return request_id

    def _send(self, kind: FrameKind, message: Any) -> int:
        request_id = self._new_request_id()
        sock = self._sock
        assert sock is not None
        sock.sendall(encode_frame(kind, request_id, encode_msgpack(message)))
        return request_id

    def _receive(self) -> tuple[FrameKind, int, bytes]:
        sock = self._sock
        assert sock is not None
        header = _read_exactly(sock, FRAME_HEADER.size)
        try:
            kind, request_id, length = parse_frame_header(header)
        except FrameFormatError as exc:
            raise ServerUnavailable(f"the sidecar sent a bad frame: {exc}") from exc
        return kind, request_id, _read_exactly(sock, length)

    def _call(self, kind: FrameKind, message: Any, reply_kind: FrameKind,
              reply: type[T]) -> T:
        with self._lock:
            request_id = self._send(kind, message)
            while True:
                got, got_id, payload = self._next_reply()
                if got_id == request_id:
                    if got is FrameKind.ERROR:
                        raise _rejected(payload)
                    if got is not reply_kind:
                        raise ServerUnavailable(f"the sidecar answered {got.name}, "
                                                f"expected {reply_kind.name}")
                    return msgspec.msgpack.decode(payload, type=reply)

    def _next_reply(self) -> tuple[FrameKind, int, bytes]:
        """The next reply frame; pushed frames (request id 0) are handled on the way."""
        while True:
            kind, request_id, payload = self._receive()
            if request_id != 0:
                return kind, request_id, payload
            if kind is FrameKind.RUN:
                self._handle_opened(msgspec.msgpack.decode(payload, type=RunOpened))
            elif kind is FrameKind.ERROR:
                error = msgspec.msgpack.decode(payload, type=FrameError)
                if error.fatal:
                    raise ServerUnavailable(f"the sidecar closed the connection: "
                                            f"{error.detail}")
                # A pending run the server then refused: its data goes to dead letters.
                warnings.warn(f"pluto: the server refused this run: {error.detail}",
                              RuntimeWarning, stacklevel=2)

    def _handle_opened(self, opened: RunOpened) -> None:
        if opened.run is not None and self._on_resolved is not None:
            self._on_resolved(opened.run)

    # -- Transport ------------------------------------------------------------

    def open_run(self, request: RunCreate, timeout: float) -> RunAttached:
        """The run, or a stand-in (id 0) while the server is away: ``run_id`` is known
        either way and the numeric ids fill in when the sidecar pushes them."""
        self._request = request
        self.run_key = (request.project, request.run_id or "")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._lock:
                    self._connection()
                    opened = self._call(FrameKind.OPEN_RUN, request, FrameKind.RUN, RunOpened)
                    self._opened = True
                break
            except ServerUnavailable as exc:
                with self._lock:
                    self._drop()
                if time.monotonic() >= deadline:
                    # The sidecar is not up yet: carry on, the SDK connects when it appears.
                    # Said once, as a mistyped PLUTO_SIDECAR_SOCKET looks just the same.
                    warnings.warn(
                        f"pluto: {exc}; logging goes on and is sent when the sidecar "
                        f"appears (run {request.run_id!r} has no numeric id until then). "
                        "If no sidecar runs in this pod, unset PLUTO_SIDECAR_SOCKET.",
                        RuntimeWarning, stacklevel=3)
                    self._opened = True
                    return _stand_in(request)
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            except OSError as exc:
                with self._lock:
                    self._drop()
                raise ServerUnavailable(f"the pluto sidecar at {self.path}: {exc}") from exc
        if opened.run is not None:
            return opened.run
        # Pending: the sidecar holds the open and opens the run when the server accepts it.
        # For resume=True its detail also says that this process's steps start again, since
        # nobody knows the run's last step yet (step= given to log() is kept as given).
        detail = opened.pending or "the server has not answered yet"
        warnings.warn(f"pluto: run {request.run_id!r} is pending: {detail}" if request.resume
                      else f"pluto: run {request.run_id!r} is pending ({detail}); logging goes "
                      "on and the sidecar delivers it all once the server accepts the run",
                      RuntimeWarning, stacklevel=3)
        return _stand_in(request)

    def on_resolved(self, callback: Resolved) -> None:
        self._on_resolved = callback

    def update_run(self, run_id: int, request: RunUpdate) -> RunInfo | None:
        assert self.run_key is not None
        try:
            with self._lock:
                self._connection()
                self._call(FrameKind.UPDATE_RUN, RunUpdateRequest(
                    project=self.run_key[0], run_ref=self.run_key[1], update=request),
                    FrameKind.UPDATED, Ack)
        except OSError as exc:
            with self._lock:
                self._drop()
            raise ServerUnavailable(f"the pluto sidecar at {self.path}: {exc}") from exc
        return None  # queued durably; the sidecar applies it in order with the data

    def deliver(self, chunks: list[bytes]) -> IngestResult:
        """Send chunk frames and wait until the sidecar has spooled every one."""
        try:
            with self._lock:
                self._connection()
                if not self._told_gpus:
                    self._tell_node()
                sock = self._sock
                assert sock is not None
                pending: dict[int, int] = {}
                for payload in chunks:
                    request_id = self._new_request_id()
                    # Header and payload apart: a chunk of MBs is not copied to join them.
                    sock.sendall(frame_header(FrameKind.CHUNK, request_id, len(payload)))
                    sock.sendall(payload)
                    pending[request_id] = 1
                rejected: RequestRejected | None = None
                while pending:
                    kind, request_id, payload = self._next_reply()
                    if pending.pop(request_id, None) is None:
                        continue
                    if kind is FrameKind.ERROR:
                        rejected = rejected or _rejected(payload)
            if rejected is not None:
                raise rejected
            return IngestResult(applied=len(chunks), duplicates=0, points=0)
        except OSError as exc:
            with self._lock:
                self._drop()
            raise ServerUnavailable(f"the pluto sidecar at {self.path}: {exc}") from exc
        except ServerUnavailable:
            with self._lock:
                self._drop()
            raise

    @property
    def destination(self) -> str:
        return f"sidecar {self.path}"

    def interrupt(self) -> None:
        # Not under the lock: the sender holds it while it waits for the sidecar (a hung
        # one answers nothing for up to ``timeout``). shutdown() wakes that wait at once.
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.interrupt()
        with self._lock:
            self._drop()


def _stand_in(request: RunCreate) -> RunAttached:
    now = time.time()
    return RunAttached(
        id=0, project=request.project, display_id="", run_id=request.run_id,
        name=request.name or request.run_id or "", config=request.config or {},
        tags=request.tags or [], status=RunStatus.RUNNING, created_at=now, updated_at=now,
        fork_step=request.fork_step, resumed=False,
    )


def _rejected(payload: bytes) -> RequestRejected:
    error = msgspec.msgpack.decode(payload, type=FrameError)
    status, detail = 400, error.detail
    if detail.endswith(")") and "(HTTP " in detail:
        # The sidecar relays the server's answer as "<detail> (HTTP <code>)"; RequestRejected
        # adds the code itself, so it is taken off here (it was shown twice).
        rest, code = detail.rsplit(" (HTTP ", 1) if " (HTTP " in detail else (detail, "")
        code_number = parse_digits(code.rstrip(")"))
        if code_number is not None:
            status, detail = code_number, rest
    return RequestRejected(status, detail)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        piece = sock.recv(size - len(buffer))
        if not piece:
            raise ConnectionResetError("the sidecar closed the connection")
        buffer += piece
    return bytes(buffer)
