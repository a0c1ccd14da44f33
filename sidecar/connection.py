"""One client connection: a rank's SDK speaking the frame protocol of ``pluto.wire``.

A bad frame gets an ERROR frame that says what to change; only a frame that
breaks the stream (bad header, oversized) closes the connection. Other clients
are never affected. Before reading each frame the handler waits for room in the
spool: that is the back-pressure that slows producers down instead of dropping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from pluto.errors import PlutoError, RequestRejected
from pluto.wire import (
    FRAME_HEADER,
    PROTOCOL_VERSION,
    Ack,
    ChunkEnvelope,
    FrameError,
    FrameFormatError,
    FrameKind,
    Hello,
    RunAttached,
    RunCreate,
    RunOpened,
    RunUpdateRequest,
    Welcome,
    encode_frame,
    encode_msgpack,
    parse_frame_header,
)
from pluto_sidecar.logs import log_event
from pluto_sidecar.queue import RecordKind
from pluto_sidecar.registry import RunKey

if TYPE_CHECKING:
    from pluto_sidecar.sidecar import Sidecar

log = logging.getLogger("pluto.sidecar.connection")


class ClientError(Exception):
    """A frame this client must fix; ``fatal`` closes the connection."""

    def __init__(self, detail: str, *, fatal: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fatal = fatal


class Connection:
    def __init__(self, sidecar: Sidecar, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.sidecar = sidecar
        self.reader = reader
        self.writer = writer
        self.hello: Hello | None = None
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        telemetry = self.sidecar.telemetry
        telemetry.connected_clients.inc()
        try:
            await self._serve()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; what it sent and we acknowledged is spooled
        finally:
            telemetry.connected_clients.dec()
            self.sidecar.registry.unsubscribe(self._on_resolved)
            # Pending ACKs may still go out (the client may be reading); then close.
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
            for task in list(self._tasks):
                task.cancel()
            self.writer.close()

    async def _serve(self) -> None:
        while True:
            await self.sidecar.queue.room()
            try:
                kind, request_id, payload = await self._read_frame()
            except ClientError as exc:
                await self._send_error(0, exc)
                return
            if kind is None:
                return
            self.sidecar.telemetry.frames_in.labels(kind=kind.name.lower()).inc()
            try:
                await self._dispatch(kind, request_id, payload)
            except ClientError as exc:
                await self._send_error(request_id, exc)
                if exc.fatal:
                    return

    async def _read_frame(self) -> tuple[FrameKind | None, int, bytes]:
        timeout = self.sidecar.settings.hello_timeout if self.hello is None else None
        try:
            header = await asyncio.wait_for(self.reader.readexactly(FRAME_HEADER.size), timeout)
        except TimeoutError:
            raise ClientError(
                f"no HELLO within {timeout:g}s: a client starts with a HELLO frame",
                fatal=True) from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ClientError("connection closed in the middle of a frame header",
                                  fatal=True) from None
            return None, 0, b""
        try:
            kind, request_id, length = parse_frame_header(
                header, self.sidecar.settings.max_frame_bytes)
        except FrameFormatError as exc:
            self.sidecar.telemetry.client_errors.labels(reason="bad_header").inc()
            raise ClientError(str(exc), fatal=True) from None
        return kind, request_id, await self.reader.readexactly(length)

    async def _dispatch(self, kind: FrameKind, request_id: int, payload: bytes) -> None:
        if self.hello is None:
            if kind is not FrameKind.HELLO:
                raise ClientError("the first frame must be HELLO", fatal=True)
            hello = _decode(payload, Hello)
            if hello.protocol != PROTOCOL_VERSION:
                raise ClientError(f"protocol {hello.protocol} is not supported; this sidecar "
                                  f"speaks {PROTOCOL_VERSION}", fatal=True)
            self.hello = hello
            await self._send(FrameKind.WELCOME, request_id, Welcome(
                protocol=PROTOCOL_VERSION,
                max_frame_bytes=self.sidecar.settings.max_frame_bytes,
                sidecar=self.sidecar.version))
        elif kind is FrameKind.CHUNK:
            await self._chunk(request_id, payload)
        elif kind is FrameKind.OPEN_RUN:
            # Opening may wait for the server: don't hold up this client's chunks meanwhile.
            self._spawn(self._open_run(request_id, _decode(payload, RunCreate)))
        elif kind is FrameKind.UPDATE_RUN:
            _decode(payload, RunUpdateRequest)
            ticket = self.sidecar.queue.append(RecordKind.UPDATE, payload)
            await self.sidecar.queue.durable(ticket)
            await self._send(FrameKind.UPDATED, request_id, Ack(seq=0))
        else:
            raise ClientError(f"a client does not send {kind.name} frames")

    async def _chunk(self, request_id: int, payload: bytes) -> None:
        chunk = _decode(payload, ChunkEnvelope, "Chunk")
        if chunk.run == 0 and not (chunk.project and chunk.run_ref):
            raise ClientError("a chunk names its run: run id, or project and run_ref")
        queue = self.sidecar.queue
        ticket = queue.append(RecordKind.CHUNK, payload)
        self.sidecar.telemetry.points_in.inc(chunk.point_count)
        # Keep reading while the fsync happens: frames in flight share one commit.
        self._spawn(self._ack_when_durable(ticket, request_id, chunk.seq))

    async def _ack_when_durable(self, ticket: int, request_id: int, seq: int) -> None:
        await self.sidecar.queue.durable(ticket)  # the ACK promises the chunk is on disk
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(FrameKind.ACK, request_id, Ack(seq=seq))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_run(self, request_id: int, request: RunCreate) -> None:
        try:
            opened = await self.sidecar.open_run(request, self._on_resolved)
            await self._send(FrameKind.RUN, request_id, opened)
        except RequestRejected as exc:
            await self._send_error(request_id, ClientError(f"{exc.detail} (HTTP "
                                                           f"{exc.status_code})"))
        except ClientError as exc:
            await self._send_error(request_id, exc)
        except (PlutoError, ConnectionError):
            pass

    def _on_resolved(self, key: RunKey, info: RunAttached | None, error: str | None) -> None:
        """A pending run this client opened is now known (or refused): tell it."""
        project, run_ref = key
        if info is not None:
            message: Any = RunOpened(project=project, run_ref=run_ref, run=info)
            kind = FrameKind.RUN
        else:
            message, kind = FrameError(detail=f"run {run_ref!r}: {error}"), FrameKind.ERROR
        self._spawn(self._send(kind, 0, message))

    async def _send(self, kind: FrameKind, request_id: int, message: Any) -> None:
        async with self._write_lock:
            self.writer.write(encode_frame(kind, request_id, encode_msgpack(message)))
            await self.writer.drain()

    async def _send_error(self, request_id: int, exc: ClientError) -> None:
        self.sidecar.telemetry.client_errors.labels(
            reason="fatal" if exc.fatal else "rejected").inc()
        log_event(log, "client error", detail=exc.detail, fatal=exc.fatal,
                  pid=self.hello.pid if self.hello else None, level=logging.WARNING)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(FrameKind.ERROR, request_id,
                             FrameError(detail=exc.detail, fatal=exc.fatal))


def _decode(payload: bytes, kind: type[Any], name: str | None = None) -> Any:
    try:
        return msgspec.msgpack.decode(payload, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ClientError(f"invalid {name or kind.__name__} frame: {exc}") from None
