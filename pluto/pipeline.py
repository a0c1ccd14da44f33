"""The background half of ``run.log()``: rows -> chunks -> spool -> server.

``log()`` only appends to ``rows``. One daemon thread packs rows into columnar
chunks, appends each chunk to the durable spool, then delivers spooled chunks in
order and acknowledges them once the server has applied them. When the server
is away the spool grows on disk, not in memory, and is delivered when it
returns; a chunk the server refuses for good goes to a dead-letter file.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from pluto.errors import PlutoError, RequestRejected
from pluto.spool import Spool, SpoolFull, SpoolLocked, is_spool_name
from pluto.transport.base import Transport
from pluto.wire import Chunk, LogLine, RunStatus, encode_msgpack

log = logging.getLogger("pluto")

Row = tuple[int, float, dict[str, float]]
SEND_BATCH = 64  # chunks per request at most
SEND_BYTES = 8 * 1024 * 1024  # and about this many bytes: well under the server's body limit
MAX_BACKOFF = 10.0
#: Requests' worth of a spool left by an earlier process delivered per pass of the sender,
#: after this run's own data: a large leftover never holds this run's data back.
ADOPT_BATCHES = 4
#: An encoded chunk is at most this big, well under the sidecar's frame limit
#: (``wire.MAX_FRAME_BYTES``) and the server's body limit: a bigger one (10,000 console
#: lines of 16 KiB, or ``max_chunk_points`` set high) is cut in two until it fits.
MAX_CHUNK_BYTES = 8 * 1024 * 1024
#: Console lines in one chunk at most.
MAX_CHUNK_LINES = 10_000
#: In each spool directory: ``Transport.destination`` of the process that wrote it.
DESTINATION_FILE = "destination"


@dataclass
class DeliveryState:
    """What ``finish()`` reports when it cannot deliver everything in time."""

    delivered_points: int = 0
    dead_letters: int = 0
    last_error: str | None = None


class Pipeline:
    def __init__(
        self,
        *,
        run_id: int,
        writer: int,
        transport: Transport,
        spool_root: Path,
        flush_interval: float,
        max_chunk_points: int,
        max_buffered_calls: int,
        fsync: bool,
        session: str | None = None,
        run_ref: tuple[str, str] | None = None,
    ) -> None:
        self.run_id = run_id
        #: (project, external id): chunks name their run this way when a sidecar forwards
        #: them, so data can flow before the numeric id is known.
        self.run_ref = run_ref
        self.writer = writer
        self.session = session or uuid.uuid4().hex
        self.transport = transport
        self.flush_interval = flush_interval
        self.max_chunk_points = max_chunk_points
        self.max_buffered_calls = max_buffered_calls
        self.rows: collections.deque[Row] = collections.deque()
        self.logs: collections.deque[LogLine] = collections.deque()
        self.state = DeliveryState()
        self.spool_root = spool_root
        self.spool = Spool(spool_root / self.session, fsync=fsync)
        # Before any chunk: a leftover is only delivered where its chunks' run ids mean
        # the same runs (see _adopt_some).
        (self.spool.directory / DESTINATION_FILE).write_text(transport.destination)
        self._seq = 0
        #: A packed chunk the spool could not take (its volume full and as much as it may
        #: hold already in memory): kept here and appended first on the next pass, while
        #: packing stops, so ``rows`` fills up and ``log()`` is held back instead.
        self._unspooled: bytes | None = None
        self._final: RunStatus | None = None
        self._final_spooled = False
        self._wake = threading.Event()
        self._room = threading.Condition()
        self._stopping = False
        self._idle = threading.Event()
        #: Spools left by processes that died before delivering everything, oldest first,
        #: and the one being delivered (see ``_adopt_some``).
        self._orphans: collections.deque[Path] = collections.deque()
        self._orphan: Spool | None = None
        self._thread = threading.Thread(target=self._run, name="pluto-sender", daemon=True)
        self._thread.start()

    # -- called from the training thread -----------------------------------

    def wait_for_room(self) -> None:
        """Back-pressure: block the caller until the sender has caught up a little."""
        self._wake.set()
        with self._room:
            while len(self.rows) >= self.max_buffered_calls and self._thread.is_alive():
                self._room.wait(0.1)

    def kick(self) -> None:
        self._wake.set()

    def finish(self, status: RunStatus) -> None:
        """After everything logged so far, the run ends with ``status``."""
        self._final = status
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until everything logged so far is delivered; False on timeout. Spools left
        by earlier processes are delivered meanwhile too, as far as the time allows (what
        is left of them stays on disk for the next ``init()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._idle.clear()
            self._wake.set()
            if self._idle.wait(min(0.5, max(0.0, deadline - time.monotonic()))) and (
                self._quiet() and not self._orphans
            ):
                return True
            if not self._thread.is_alive():
                return False
        return self._quiet()

    def close(self, timeout: float) -> bool:
        delivered = self.drain(timeout)
        self._stopping = True
        self._wake.set()
        if not delivered:  # a send may be waiting on a server or sidecar that hangs
            self.transport.interrupt()
        self._thread.join(timeout=5)
        self.spool.close(remove_if_empty=delivered)
        return delivered

    @property
    def pending_bytes(self) -> int:
        return self.spool.pending_bytes + len(self._unspooled or b"")

    @property
    def unwritten_bytes(self) -> int:
        """The part of ``pending_bytes`` only in memory: its spool's volume had no room."""
        return self.spool.held_bytes + len(self._unspooled or b"")

    # -- the sender thread ---------------------------------------------------

    def _run(self) -> None:
        self._find_orphans()
        backoff = 0.0
        while not self._stopping:
            self._wake.wait(max(self.flush_interval, backoff))
            self._wake.clear()
            try:
                try:
                    self._pack()
                except SpoolFull as exc:
                    # Nothing is dropped (see _unspooled); delivering what is spooled is
                    # what frees the space, so the pass goes on to send.
                    self.state.last_error = repr(exc)
                # This run's own data first; then some of what earlier processes left.
                sent = self._send() and self._adopt_some()
                backoff = 0.0 if sent else min(MAX_BACKOFF, max(0.2, backoff * 2))
            except Exception as exc:  # the sender must outlive any one bad chunk
                log.exception("pluto sender error")
                self.state.last_error = repr(exc)
                backoff = min(MAX_BACKOFF, max(0.2, backoff * 2))
            if backoff:
                backoff *= 0.5 + random.random()  # jitter: ranks don't retry in lockstep
            if self._quiet() and not self._orphans:
                self._idle.set()
        # Stopping (finish() gave up): what is still in memory goes to the spool, which
        # the next init() in this dir delivers.
        try:
            self._pack()
        except Exception as exc:  # SpoolFull: reported by finish() as held in memory
            self.state.last_error = repr(exc)
        if self._orphan is not None:
            self._orphan.close(remove_if_empty=True)
            self._orphan = None

    def _quiet(self) -> bool:
        return (not self.rows and not self.logs and self._unspooled is None and self.spool.empty
                and (self._final is None or self._final_spooled))

    def _pack(self) -> None:
        final = self._final  # read first: every row logged before finish() is queued by now
        if self._unspooled is not None:
            self.spool.append(self._unspooled)  # SpoolFull again while there is no room
            self._unspooled = None
        while self.rows or self.logs:
            batch: list[Row] = []
            points = 0
            while self.rows and points < self.max_chunk_points:
                row = self.rows.popleft()
                batch.append(row)
                points += len(row[2])
            lines: list[LogLine] = []
            while self.logs and len(lines) < MAX_CHUNK_LINES:
                lines.append(self.logs.popleft())
            with self._room:
                self._room.notify_all()
            if batch or lines:
                self._spool_rows(batch, lines)
        if final is not None and not self._final_spooled:
            chunk = self._chunk(finish=final)
            self._seq += 1
            self._final_spooled = True  # in the spool, or in _unspooled until it has room
            self._spool_chunk(encode_msgpack(chunk))

    def _spool_rows(self, batch: list[Row], lines: list[LogLine]) -> None:
        """Spool ``batch`` and ``lines`` as one chunk, or as several when one would be over
        ``MAX_CHUNK_BYTES`` (halves, in order, until each fits)."""
        keys: dict[str, int] = {}
        key_index: list[int] = []
        steps: list[int] = []
        values: list[float] = []
        times: list[float] = []
        # A training loop logs the same keys call after call: the key indices of a row are
        # looked up once per layout (its keys, in order) and every column grows by a whole
        # row at a time. Per point that is a fifth of what appending one point at a time
        # cost, in each rank, on the cores the sidecar and server share.
        layout: tuple[str, ...] = ()
        indices: list[int] = []
        for step, at, data in batch:
            names = tuple(data)
            if names != layout:
                layout = names
                indices = [keys.setdefault(key, len(keys)) for key in names]
            n = len(indices)
            key_index += indices
            values += data.values()
            steps += [step] * n
            times += [at] * n
        payload = encode_msgpack(self._chunk(keys=list(keys), key_index=key_index, steps=steps,
                                             values=values, times=times, logs=lines))
        if len(payload) > MAX_CHUNK_BYTES:
            del keys, key_index, steps, values, times
            if len(batch) > 1:
                half = len(batch) // 2
                parts = [(batch[:half], []), (batch[half:], lines)]
            elif batch and lines:
                parts = [(batch, []), ([], lines)]
            elif len(lines) > 1:
                half = len(lines) // 2
                parts = [([], lines[:half]), ([], lines[half:])]
            else:  # one log() call of hundreds of thousands of keys: no server takes it
                _dead_letter(self.spool_root, payload, RequestRejected(
                    413, f"one log() call made a chunk of {len(payload)} bytes, more than "
                    f"{MAX_CHUNK_BYTES} can be sent; log fewer keys per call"), self.state,
                    refused_by="pluto (before sending it)")
                return
            del payload
            for part_rows, part_lines in parts:
                self._spool_rows(part_rows, part_lines)
            return
        self._seq += 1
        self._spool_chunk(payload)

    def _spool_chunk(self, payload: bytes) -> None:
        try:
            self.spool.append(payload)
        except SpoolFull:
            self._unspooled = payload
            raise

    def _chunk(self, **fields: Any) -> Chunk:
        if self.run_ref is not None:
            project, ref = self.run_ref
            return Chunk(run=0, project=project, run_ref=ref, session=self.session,
                         seq=self._seq, writer=self.writer, **fields)
        return Chunk(run=self.run_id, session=self.session, seq=self._seq, writer=self.writer,
                     **fields)

    def _send(self) -> bool:
        """Deliver spooled chunks in order; False when the server could not take them."""
        return _deliver_spool(self.spool, self.transport, self.state, self.spool_root)

    def _find_orphans(self) -> None:
        """The spools in this dir that other sessions left (live ones are skipped when
        opened: their owner holds the lock)."""
        try:
            found = sorted(self.spool_root.iterdir())
        except OSError:
            return
        self._orphans.extend(
            directory for directory in found
            if directory.name != self.session and is_spool_name(directory.name)
        )

    def _same_destination(self, orphan: Spool) -> bool:
        """Whether ``orphan``'s chunks are for where this run's go. Its chunks name runs by
        the ids of the server they were logged to: sent to another server they would land
        in whatever run has those ids there. One that is not stays, with a warning."""
        written_for = _spool_destination(orphan)
        if written_for is None or written_for == self.transport.destination:
            return True
        warnings.warn(
            f"pluto: {orphan.directory} holds data a run logged to {written_for} could not "
            f"deliver; it is not sent to {self.transport.destination}. To deliver it, run "
            f"pluto.init() with the same dir and {written_for} (PLUTO_URL, or "
            "PLUTO_SIDECAR_SOCKET for a sidecar).", RuntimeWarning, stacklevel=2)
        return False

    def _adopt_some(self) -> bool:
        """Deliver up to ``ADOPT_BATCHES`` requests' worth of the spools that processes
        which died before delivering everything left; False when the server could not
        take them. A spool that cannot be read is left where it is, with a warning."""
        while self._orphans:
            if self._orphan is None:
                try:
                    self._orphan = Spool(self._orphans[0], fsync=False, create=False)
                except (SpoolLocked, OSError):  # a live process owns it, or it vanished
                    self._orphans.popleft()
                    continue
                if not self._same_destination(self._orphan):
                    self._orphan.close()
                    self._orphan = None
                    self._orphans.popleft()
                    continue
            orphan = self._orphan
            try:
                if not orphan.empty:
                    return _deliver_spool(orphan, self.transport, self.state, self.spool_root,
                                          max_batches=ADOPT_BATCHES)
            except Exception:  # adoption is a courtesy: this run's own data comes first
                log.exception("pluto: delivering the spool %s left by an earlier process "
                              "failed; it stays there", orphan.directory)
            orphan.close(remove_if_empty=True)
            self._orphan = None
            self._orphans.popleft()
        return True


def _spool_destination(spool: Spool) -> str | None:
    try:
        return (spool.directory / DESTINATION_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return None  # written before destinations were recorded, or cut short by a crash


def _deliver_spool(spool: Spool, transport: Transport, state: DeliveryState,
                   root: Path, *, max_batches: int | None = None) -> bool:
    """Deliver ``spool``'s records in order, all of them or ``max_batches`` requests'
    worth; False when the server could not take them."""
    batches = 0
    while max_batches is None or batches < max_batches:
        batches += 1
        records = spool.read(SEND_BATCH, SEND_BYTES)
        if not records:
            return True
        try:
            result = transport.deliver([record.payload for record in records])
        except RequestRejected as exc:
            if not exc.data_refused:  # a refused key (401) says nothing about the data
                spool.rewind()
                state.last_error = str(exc)
                return False
            if len(records) > 1:
                # Find the bad chunk: send the rest one by one.
                spool.rewind()
                for record in spool.read(len(records)):
                    if not _deliver_one(record.payload, transport, state, root):
                        spool.rewind()
                        return False
                    spool.ack(record.end)
                continue
            _dead_letter(root, records[0].payload, exc, state)
        except PlutoError as exc:
            spool.rewind()
            state.last_error = str(exc)
            return False
        else:
            state.delivered_points += result.points
        spool.ack(records[-1].end)
    return True


def _deliver_one(payload: bytes, transport: Transport, state: DeliveryState,
                 root: Path) -> bool:
    try:
        state.delivered_points += transport.deliver([payload]).points
    except RequestRejected as exc:
        if not exc.data_refused:
            state.last_error = str(exc)
            return False
        _dead_letter(root, payload, exc, state)
    except PlutoError as exc:
        state.last_error = str(exc)
        return False
    return True


def _dead_letter(root: Path, payload: bytes, exc: RequestRejected, state: DeliveryState, *,
                 refused_by: str = "the server") -> None:
    """Set a refused chunk aside with the reason: never retried forever, never lost."""
    state.dead_letters += 1
    path = root.parent / "dead-letter.msgpack"
    record: dict[str, Any] = {"at": time.time(), "status": exc.status_code,
                              "detail": exc.detail, "chunk": msgspec.Raw(payload)}
    with open(path, "ab") as handle:
        handle.write(encode_msgpack(record))
    warnings.warn(
        f"pluto: {refused_by} refused a chunk of data for good "
        f"({exc if refused_by == 'the server' else exc.detail}); it was set aside in "
        f"{path}", RuntimeWarning, stacklevel=2,
    )
