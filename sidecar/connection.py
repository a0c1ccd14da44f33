"""One client connection: a rank's SDK speaking the frame protocol of ``pluto.wire``.

A bad frame gets an ERROR frame that says what to change; only a frame that
breaks the stream (bad header, oversized) closes the connection. Other clients
are never affected. Before reading each frame the handler waits for room in the
spool: that is the back-pressure that slows producers down instead of dropping.

Bytes are read by the kernel straight into the buffer a frame is spooled from
(``pluto_sidecar.stream``): a chunk's payload is never copied between the socket and the
spool file, and a connection holds at most 64 KiB that nobody asked for yet, so
a client that is not being read blocks in its own ``send``. Frames being received
share a memory budget (``ReceiveBudget``) so that many ranks sending big chunks
at once do not add up to many times the memory of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from pluto.errors import PlutoError, RequestRejected
from pluto.wire import (
    FEATURE_NODE,
    FRAME_HEADER,
    MAX_WRITER,
    PROTOCOL_VERSION,
    Ack,
    ChunkEnvelope,
    FrameError,
    FrameFormatError,
    FrameKind,
    Hello,
    NodeInfo,
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
from pluto_sidecar.stream import FrameStream

if TYPE_CHECKING:
    from pluto_sidecar.sidecar import Sidecar

log = logging.getLogger("pluto.sidecar.connection")


class ClientError(Exception):
    """A frame this client must fix; ``fatal`` closes the connection."""

    def __init__(self, detail: str, *, fatal: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fatal = fatal


#: The largest frame a client may send before its HELLO is accepted (a HELLO is tens of
#: bytes): a connection that has not introduced itself cannot make the sidecar allocate more.
HELLO_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    request_id: int
    #: What the frame was read into: from the pool (``Sidecar.frame_pool``), maybe longer.
    buffer: bytearray
    #: One spare byte (for the spool record's kind), then the frame's payload as received.
    record: memoryview
    #: The frame's share of the receive budget, to give back.
    taken: int


class Connection:
    def __init__(self, sidecar: Sidecar, stream: FrameStream) -> None:
        self.sidecar = sidecar
        self.stream = stream
        self.hello: Hello | None = None
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._hello_deadline: float | None = None  # set when the first frame is awaited

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
            self.stream.close()

    async def _serve(self) -> None:
        while True:
            if not await self._room():
                return
            try:
                frame = await self._read_frame()
            except ClientError as exc:
                await self._send_error(0, exc)
                return
            if frame is None:
                return
            self.sidecar.telemetry.frames_in.labels(kind=frame.kind.name.lower()).inc()
            request_id = frame.request_id
            try:
                try:
                    await self._dispatch(frame.kind, request_id, frame.record)
                finally:
                    self._release(frame)
                    # No reference left here: the next frame's buffer is allocated before
                    # ``frame`` is assigned again, and both at once would add to the peak.
                    del frame
            except ClientError as exc:
                await self._send_error(request_id, exc)
                if exc.fatal:
                    return

    async def _room(self) -> bool:
        """Back-pressure: wait for room in the spool before reading the next frame (see
        ``DurableQueue.room``). False when the client went away meanwhile: a client held
        back long enough times out, reconnects and waits again, and without this each of
        those connections would stay for as long as the spool has no room (a full spool
        volume can last hours). What the client sent and was not acknowledged, it resends.
        """
        queue = self.sidecar.queue
        if not queue.full:
            return True
        room = asyncio.ensure_future(queue.room())
        gone = asyncio.ensure_future(self.stream.ended())
        try:
            await asyncio.wait((room, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            gone.cancel()
        return not gone.done() or gone.cancelled()

    def _release(self, frame: Frame) -> None:
        """The frame is dealt with: its buffer goes back to the pool, unless the spool holds
        on to it (a record waiting in memory for room on the volume), then its share of the
        receive budget goes back."""
        if not self.sidecar.queue.holds(frame.record):
            self.sidecar.frame_pool.give(frame.buffer)
        self.sidecar.receive_budget.give(frame.taken)

    async def _read_frame(self) -> Frame | None:
        """The next frame (None at the end of the stream).

        Until its HELLO is accepted a client has ``hello_timeout`` seconds in all (from the
        first read) for whole frames, not only their headers, and frames of at most
        ``HELLO_MAX_BYTES``: connections that announce a big first frame and then trickle
        or stall cannot hold the sidecar's memory.
        """
        if self.hello is not None:
            return await self._read_one_frame(self.sidecar.settings.max_frame_bytes)
        timeout = self.sidecar.settings.hello_timeout
        if self._hello_deadline is None:
            self._hello_deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(self._hello_deadline):
                return await self._read_one_frame(HELLO_MAX_BYTES)
        except TimeoutError:
            raise ClientError(
                f"no HELLO within {timeout:g}s: a client starts with a HELLO frame",
                fatal=True) from None

    async def _read_one_frame(self, max_bytes: int) -> Frame | None:
        try:
            header = await self.stream.read_exactly(FRAME_HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ClientError("connection closed in the middle of a frame header",
                                  fatal=True) from None
            return None
        try:
            kind, request_id, length = parse_frame_header(
                header, self.sidecar.settings.max_frame_bytes)
        except FrameFormatError as exc:
            self.sidecar.telemetry.client_errors.labels(reason="bad_header").inc()
            raise ClientError(str(exc), fatal=True) from None
        if length > max_bytes:  # before HELLO
            self.sidecar.telemetry.client_errors.labels(reason="bad_header").inc()
            raise ClientError(
                f"frame of {length} bytes before HELLO is larger than the limit of "
                f"{max_bytes} for a first frame; a client starts with a HELLO frame",
                fatal=True)
        budget = self.sidecar.receive_budget
        taken = await budget.take(length)
        try:
            buffer = self.sidecar.frame_pool.take(1 + length)
            record = memoryview(buffer)[:1 + length]
            await self.stream.read_into(record[1:])
        except BaseException:
            budget.give(taken)
            raise
        return Frame(kind, request_id, buffer, record, taken)

    async def _dispatch(self, kind: FrameKind, request_id: int, record: memoryview) -> None:
        payload = record[1:]
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
                sidecar=self.sidecar.version, features=[FEATURE_NODE]))
        elif kind is FrameKind.CHUNK:
            await self._chunk(request_id, record)
        elif kind is FrameKind.OPEN_RUN:
            # Opening may wait for the server: don't hold up this client's chunks meanwhile.
            self._spawn(self._open_run(request_id, _decode(payload, RunCreate)))
        elif kind is FrameKind.UPDATE_RUN:
            _decode(payload, RunUpdateRequest)
            record[0] = RecordKind.UPDATE.value[0]
            ticket = self.sidecar.queue.append_record(record)
            await self.sidecar.queue.durable(ticket)
            await self._send(FrameKind.UPDATED, request_id, Ack(seq=0))
        elif kind is FrameKind.NODE:
            node = _decode(payload, NodeInfo)
            if node.node_rank is not None and not 0 <= node.node_rank <= MAX_WRITER:
                raise ClientError(f"node_rank {node.node_rank} is not a node rank: a whole "
                                  "number from 0 to 2**31-1 (torchrun's GROUP_RANK)")
            if node.gpus is not None:
                _check_gpus(node.gpus, self.sidecar.pod_gpus.uuids)
            if node.node_rank is not None:
                self.sidecar.use_node_rank(node.node_rank)
            if node.gpus is not None:
                self.sidecar.use_gpus(node.gpus)
        else:
            raise ClientError(f"a client does not send {kind.name} frames")

    async def _chunk(self, request_id: int, record: memoryview) -> None:
        chunk = _decode(record[1:], _ChunkRoute, "Chunk")
        if chunk.run == 0 and not (chunk.project and chunk.run_ref):
            raise ClientError("a chunk names its run: run id, or project and run_ref")
        if chunk.finish is not None:  # this client's last chunk of the run
            registry = self.sidecar.registry
            key = ((chunk.project, chunk.run_ref) if chunk.project and chunk.run_ref
                   else registry.key_of(chunk.run))
            if key is not None:
                registry.finished_by(key, self._on_resolved)
        # The record is the frame as received, behind its kind byte: spooled without a copy.
        record[0] = RecordKind.CHUNK.value[0]
        ticket = self.sidecar.queue.append_record(record)
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
            await self.stream.write(encode_frame(kind, request_id, encode_msgpack(message)))

    async def _send_error(self, request_id: int, exc: ClientError) -> None:
        self.sidecar.telemetry.client_errors.labels(
            reason="fatal" if exc.fatal else "rejected").inc()
        log_event(log, "client error", detail=exc.detail, fatal=exc.fatal,
                  pid=self.hello.pid if self.hello else None, level=logging.WARNING)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(FrameKind.ERROR, request_id,
                             FrameError(detail=exc.detail, fatal=exc.fatal))


class _ChunkRoute(ChunkEnvelope, kw_only=True):
    """A ``ChunkEnvelope`` and whether it is its writer's last chunk of the run (``finish``,
    the run's final status): the run's system metrics stop once its clients are done."""

    finish: str | None = None


#: Bounds on what a NODE frame may say of GPUs (a node has 16 at most today): the list is
#: kept for the sidecar's lifetime, so a client must not be able to grow it without end.
MAX_POD_GPUS = 64
MAX_GPU_UUID_CHARS = 96


def _check_gpus(gpus: list[str], known: list[str]) -> None:
    for uuid in gpus:
        if not uuid or len(uuid) > MAX_GPU_UUID_CHARS:
            raise ClientError(f"GPU {uuid[:MAX_GPU_UUID_CHARS]!r} is not a GPU UUID: NVML's "
                              f"nvmlDeviceGetUUID, 1 to {MAX_GPU_UUID_CHARS} characters")
    if len(known) + len(set(gpus) - set(known)) > MAX_POD_GPUS:
        raise ClientError(f"the ranks of this pod name more than {MAX_POD_GPUS} GPUs; a "
                          "NODE frame lists the UUIDs of its container's GPUs only")


def _decode(payload: bytes | memoryview, kind: type[Any], name: str | None = None) -> Any:
    try:
        return msgspec.msgpack.decode(payload, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ClientError(f"invalid {name or kind.__name__} frame: {exc}") from None
