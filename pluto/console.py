"""Console capture at the file-descriptor level.

Replacing ``sys.stdout`` would miss output from C extensions, subprocesses and
logging handlers that grabbed the stream before ``init()``. So fds 1 and 2 are
pointed at pipes; a reader thread copies every byte to the original terminal
(output still shows as usual) and hands complete lines to the run's log.

Stopping gives the fds back without waiting for what it cannot wait for. Processes forked
or spawned meanwhile (DataLoader workers, a subprocess) keep the pipe's write end: the
reader then goes on copying their output to the terminal until they close it, no longer
to the run, and it alone closes its copy of the terminal's fd (closed under it, the fd's
number could be reused by any file, which would receive their output). Two runs capturing
at once stack: the older one's pipe is where the newer one copies to, so only the newest
gives the fds back; when an older one finishes first, the newer one copies where the older
one copied instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

from pluto.wire import LogLine

MAX_LINE = 16 * 1024


class _Tee:
    def __init__(self, fd: int, stream_id: int, sink: Callable[[LogLine], None]) -> None:
        self.fd = fd
        self.stream_id = stream_id
        self.sink = sink
        self.saved = os.dup(fd)
        read_end, write_end = os.pipe()
        self.read_end = read_end
        #: Set once the run stopped capturing: lines still coming are copied, not logged.
        self.detached = False
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, name=f"pluto-console-{fd}",
                                       daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self.read_end, 65536)
            except OSError:
                break
            if not data:
                break
            with contextlib.suppress(OSError):
                os.write(self.saved, data)  # never stall the pipe: the writer would block
            if self.detached:
                continue
            pending += data
            *lines, pending = pending.split(b"\n")
            now = time.time()
            for line in lines:
                self._emit_in_pieces(line, now)
            while len(pending) > MAX_LINE:  # a line that goes on and on: ship it in pieces
                cut = _piece_end(pending, MAX_LINE)
                self._emit(pending[:cut], now)
                pending = pending[cut:]
        if pending and not self.detached:
            self._emit_in_pieces(pending, time.time())
        os.close(self.read_end)
        os.close(self.saved)  # here, once nothing can come: see the module docstring

    def _emit_in_pieces(self, raw: bytes, at: float) -> None:
        """A line longer than ``MAX_LINE`` bytes goes as several log lines, in order, each
        cut between two characters: shortened, but nothing of it dropped."""
        while len(raw) > MAX_LINE:
            cut = _piece_end(raw, MAX_LINE)
            self._emit(raw[:cut], at)
            raw = raw[cut:]
        self._emit(raw, at)

    def _emit(self, raw: bytes, at: float) -> None:
        try:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            self.sink(LogLine(time=at, stream=self.stream_id, line=text))
        except Exception:  # a log line must never take the pump down
            pass

    def give_back(self) -> None:
        """Point the fd at what it was before (closing our pipe's write end that it held)."""
        os.dup2(self.saved, self.fd)

    def drain(self, deadline: float) -> None:
        """Let the reader log what the pipe holds until ``deadline`` (monotonic) at most;
        then, if others still hold the pipe open, it goes on copying without logging."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        self.detached = True


def _piece_end(raw: bytes, limit: int) -> int:
    """Where to cut ``raw`` at or before ``limit`` (> 0) so that no UTF-8 character is split:
    back over continuation bytes (``0b10xxxxxx``), at most 3. Bytes that are not UTF-8 are
    cut at ``limit``."""
    cut = limit
    while cut > limit - 3 and cut > 1 and raw[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut if raw[cut] & 0xC0 != 0x80 else limit


#: Captures of this process, oldest first (one per run that captures its console).
_active: list[ConsoleCapture] = []
_active_lock = threading.Lock()


def _forget_in_forked_child() -> None:
    """A child of ``os.fork()`` has none of the parent's reader threads (and the lock may
    have been held by one of the parent's threads): it starts with no capture."""
    global _active_lock
    _active.clear()
    _active_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_forked_child)


class ConsoleCapture:
    def __init__(self, sink: Callable[[LogLine], None]) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with _active_lock:
            self._tees = [_Tee(1, 1, sink), _Tee(2, 2, sink)]
            _active.append(self)

    def stop(self, timeout: float = 0.5) -> None:
        """Stop capturing; what the pipes hold is logged for ``timeout`` seconds at most,
        in all (not per fd): only output of processes that outlive the run waits that long."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with _active_lock:
            index = _active.index(self) if self in _active else None
            newer = (_active[index + 1] if index is not None and index + 1 < len(_active)
                     else None)
            if index is not None:
                del _active[index]
            if newer is None:
                for tee in self._tees:
                    tee.give_back()
            else:
                # The fds are the newer capture's, and it copies into our pipes: it copies
                # where we copy instead, which closes our pipes' last write ends (but for
                # processes forked meanwhile).
                for ours, theirs in zip(self._tees, newer._tees, strict=True):
                    os.dup2(ours.saved, theirs.saved)
        deadline = time.monotonic() + timeout
        for tee in self._tees:
            tee.drain(deadline)
        self._tees = []
