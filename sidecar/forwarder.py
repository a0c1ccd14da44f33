"""Forwarder: spool records -> the tracking server, in order, each applied once.

Consecutive chunks are sent as one compressed batch once it is big enough or its
oldest record old enough. The spool is acknowledged only after the server
answers; a retried batch is harmless because the server applies each chunk once
(its (run, session, seq) key). Errors that retrying cannot fix move the record to
a dead-letter file with the server's reason; a refused API key (401) is not one of
them: it says nothing about the record, so the spool keeps it and the forwarder tries
again (with the key file's new key, if it changed: ``pluto.credentials``).

One request is in flight at a time, so batches reach the server in spool order.
While it is, the next batch is located in the spool, and it is compressed (in a
worker thread) as soon as the server has answered, so that only one compressed
batch is in memory at a time. A prepared batch is only a read ahead: nothing is
acknowledged for it until it is sent, and it is dropped whenever the forwarder
rewinds. It is compressed straight from the spool file, a piece at a time, and its
records keep only their positions, not their bytes (for big chunks those were the
largest thing in the sidecar's memory); in the rare case that the server refuses
the batch for good, they are read again from the spool to find the bad one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from pluto.errors import PlutoError, RequestRejected
from pluto.spool import Record
from pluto.transport.http import ingest_body_head
from pluto.wire import RunCreate, RunUpdateRequest, encode_msgpack
from pluto_sidecar.compression import Body
from pluto_sidecar.logs import log_event
from pluto_sidecar.queue import DurableQueue, RecordKind, Span
from pluto_sidecar.registry import RunRegistry
from pluto_sidecar.telemetry import Telemetry
from pluto_sidecar.upstream import EncodingRefused, Upstream

log = logging.getLogger("pluto.sidecar.forwarder")

MAX_BACKOFF = 30.0
MAX_RECORDS = 4096
#: While a batch waits to fill up (``batch_max_age``), how often it looks again.
FILL_POLL_SECONDS = 0.01


class Prepared(NamedTuple):
    """A batch read ahead: its records and, when they are all chunks, the request body
    (the records' payloads are then dropped: see the module docstring)."""

    records: list[Record]
    body: Body | None


class Forwarder:
    def __init__(self, queue: DurableQueue, upstream: Upstream, registry: RunRegistry,
                 telemetry: Telemetry, *, batch_max_bytes: int, batch_max_age: float,
                 dead_letter: Path) -> None:
        self.queue = queue
        self.upstream = upstream
        self.registry = registry
        self.telemetry = telemetry
        self.batch_max_bytes = batch_max_bytes
        self.batch_max_age = batch_max_age
        self.dead_letter = dead_letter
        self._backoff = 0.0
        self._first_seen: float | None = None
        self._ahead: asyncio.Task[Prepared] | None = None
        #: Set while no batch is at the server: a batch read ahead is compressed only then.
        self._idle = asyncio.Event()
        self._idle.set()

    async def run_forever(self) -> None:
        while True:
            await self.step()

    async def step(self) -> bool:
        """Forward what is ready; True when the spool was emptied."""
        await self.queue.wait_for_data(timeout=1.0)
        if self.queue.empty:
            self._first_seen = None
            return True
        records: list[Record] = []
        body: Body | None = None
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            try:
                records, body = await ahead
            except Exception as exc:  # read it again below, the ordinary way
                log_event(log, "reading ahead failed", error=repr(exc), level=logging.WARNING)
                self.queue.rewind()  # everything before it is acknowledged
                records, body = [], None
        if not records:
            await self._fill()
            records = await self.queue.read(MAX_RECORDS, self.batch_max_bytes)
        if not records:
            return self.queue.empty
        # Whatever is spooled past this batch is located while it is sent (and compressed
        # once it has been answered: see ``_prepare``).
        self._ahead = asyncio.create_task(self._prepare(), name="forwarder-read-ahead")
        self._idle.clear()
        try:
            sent = await self._forward(records, body)
        finally:
            del records, body
            self._idle.set()
        if sent:
            self._backoff = 0.0
            self._first_seen = None
        else:
            self._drop_ahead()
            self.queue.rewind()
            self._backoff = min(MAX_BACKOFF, max(0.25, self._backoff * 2))
            self.telemetry.retries.inc()
            # Jitter, so sidecars of many nodes do not retry in lockstep after an outage.
            await asyncio.sleep(self._backoff * (0.5 + random.random()))
        return sent and self.queue.empty

    async def drain(self, deadline: float) -> bool:
        """Forward until the spool is empty or the deadline (monotonic) passes."""
        # A send cancelled mid-flight (the forwarder task) acknowledged nothing: read again
        # from the first unacknowledged record, never from past the cancelled batch.
        self._drop_ahead()
        self.queue.rewind()
        self.batch_max_age = 0.0
        while time.monotonic() < deadline:
            try:
                if await asyncio.wait_for(self.step(), max(0.1, deadline - time.monotonic())):
                    return True
            except TimeoutError:
                break
        return self.queue.empty

    async def _fill(self) -> None:
        """Give a batch until ``batch_max_age`` after its first record was seen to reach
        ``batch_max_bytes``; a full batch goes at once."""
        now = time.monotonic()
        self._first_seen = self._first_seen or now
        # Look again now and then rather than sleeping out the age: ranks that send big
        # chunks fill a batch in a few ms, and sleeping 0.2 s then was pure latency.
        while (now - self._first_seen < self.batch_max_age
               and self.queue.pending_bytes < self.batch_max_bytes):
            await asyncio.sleep(min(FILL_POLL_SECONDS,
                                    self.batch_max_age - (now - self._first_seen)))
            now = time.monotonic()

    async def _prepare(self) -> Prepared:
        """The next batch, read ahead of the one being sent; its body compressed when it
        holds only chunks (mixed batches are sent piece by piece by ``_forward``).

        A batch of chunks goes from the spool file into the compressor a piece at a time,
        never whole: its records keep only their positions (see the module docstring).
        """
        spans = await self.queue.read_spans(MAX_RECORDS, self.batch_max_bytes)
        if not spans:
            return Prepared([], None)
        if any(span.kind != RecordKind.CHUNK.value for span in spans):
            return Prepared(await self.queue.records(spans), None)
        # Compressed once the batch before is answered, not while it is at the server: one
        # compressed batch in memory instead of two. With noisy metrics a 4.4 MB chunk is a
        # 1.7 MB body, and the second one was 2.5 MB of the sidecar's peak with one fast
        # rank (56-57 against 59 MB), for 4 % of that rank's points/s (zstd compresses it in
        # about 5 ms; the server takes several times that): docs/benchmarks.md.
        await self._idle.wait()
        body = await asyncio.to_thread(self._compress, spans)
        return Prepared([Record(b"", span.end) for span in spans], body)

    def _compress(self, spans: list[Span]) -> Body:
        """The compressed ``IngestBatch`` of the chunks at ``spans`` (in a worker thread)."""
        head = ingest_body_head(len(spans))
        # Each payload is written but its kind byte (``stream_payloads``).
        stream = self.upstream.body_stream(len(head) + sum(span.length - 1 for span in spans))
        stream.write(head)
        self.queue.spool.stream_payloads(spans, stream.write)
        return stream.finish()

    def _drop_ahead(self) -> None:
        """Forget the batch read ahead (the read position is rewound after this)."""
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    async def _forward(self, records: list[Record], body: Body | None = None) -> bool:
        """Send records in order; False (and nothing acknowledged past the failure) on a
        transient error. ``body``: the records' request body, compressed ahead of time
        (they are then all chunks)."""
        if body is not None:
            return await self._send_chunks(records, body)
        group: list[Record] = []
        for record in records:
            kind = RecordKind(record.payload[:1])
            if kind is RecordKind.CHUNK:
                group.append(record)
                continue
            if group and not await self._send_chunks(group):
                return False
            group = []
            if not await self._send_control(kind, record):
                return False
        return not group or await self._send_chunks(group)

    async def _send_chunks(self, group: list[Record], body: Body | None = None) -> bool:
        try:
            if body is None:
                body = await self.upstream.prepare(_chunk_views(group))
            result = await self.upstream.send_ingest(body)
        except RequestRejected as exc:
            if not exc.data_refused:
                return self._transient(exc)
            if not group[0].payload:  # a prepared batch: its bytes are only in the spool
                group = await self.queue.reread(len(group))
            if len(group) > 1:  # find the bad one(s): the rest must still go
                for record in group:
                    if not await self._send_chunks([record]):
                        return False
                return True
            self._bury(group[0], exc)
        except PlutoError as exc:
            return self._transient(exc)
        else:
            self.telemetry.batches_sent.inc()
            self.telemetry.points_sent.inc(result.points)
            self.telemetry.bytes_sent.labels(encoding=body.encoding).inc(len(body.data))
        await self.queue.ack(group[-1].end)
        return True

    async def _send_control(self, kind: RecordKind, record: Record) -> bool:
        body = record.payload[1:]
        try:
            if kind is RecordKind.OPEN:
                request = msgspec.msgpack.decode(body, type=RunCreate)
                info = await self.upstream.open_run(request)
                self.registry.resolve((request.project, request.run_id or ""), info, request)
                log_event(log, "run opened", project=request.project, run_ref=request.run_id,
                          run=info.id, display_id=info.display_id)
            else:
                update = msgspec.msgpack.decode(body, type=RunUpdateRequest)
                await self.upstream.update_run(update, await self._run_number(update))
        except RequestRejected as exc:
            if not exc.data_refused:
                return self._transient(exc)
            if kind is RecordKind.OPEN:
                request = msgspec.msgpack.decode(body, type=RunCreate)
                self.registry.fail((request.project, request.run_id or ""), exc.detail)
            self._bury(record, exc)
        except PlutoError as exc:
            return self._transient(exc)
        await self.queue.ack(record.end)
        return True

    async def _run_number(self, update: RunUpdateRequest) -> int:
        """The numeric id of the run an update names by external id.

        The server reads an all-digit reference as a numeric id first, so ``/runs/2`` is
        the run whose numeric id is 2, not the one whose ``run_id`` is "2"; only the
        numeric id names a run unambiguously. The run's OPEN is spooled before its
        updates, so it is normally known here; after a restart of the sidecar it is looked
        up by external id.
        """
        entry = self.registry.get((update.project, update.run_ref))
        if entry is not None and entry.info is not None:
            return entry.info.id
        return await self.upstream.find_run_number(update.project, update.run_ref)

    def _transient(self, exc: PlutoError) -> bool:
        if isinstance(exc, EncodingRefused):
            return False  # sent again as gzip (``Upstream`` logged why)
        if isinstance(exc, RequestRejected) and exc.credentials_refused:
            # About the key, not the data: keep it all and try again, with the key the
            # Secret holds by then when it is mounted as a file (``ApiKey`` follows it).
            log_event(log, "the server refuses the sidecar's API key; everything stays in "
                      "the spool and is sent once the key is accepted: fix the key in the "
                      "Secret (a file given to --api-key-file is followed; PLUTO_API_KEY "
                      "needs a restart of the sidecar)", error=str(exc), level=logging.ERROR)
            return False
        log_event(log, "server unavailable, will retry", error=str(exc),
                  backoff_seconds=round(self._backoff, 2), level=logging.WARNING)
        return False

    def _bury(self, record: Record, exc: RequestRejected) -> None:
        """A record the server refuses for good: set aside with the reason, counted."""
        entry: dict[str, Any] = {"at": time.time(), "status": exc.status_code,
                                 "detail": exc.detail, "kind": record.payload[:1].decode(),
                                 "record": msgspec.Raw(record.payload[1:])}
        with open(self.dead_letter, "ab") as handle:
            handle.write(encode_msgpack(entry))
        self.telemetry.dead_letters.inc()
        log_event(log, "record refused by the server, moved to dead letters",
                  status=exc.status_code, detail=exc.detail, file=str(self.dead_letter),
                  level=logging.ERROR)


def _chunk_views(records: list[Record]) -> list[memoryview]:
    """The chunks of records, as views past each record's kind byte: not copied."""
    return [memoryview(record.payload)[1:] for record in records]
