"""Console capture at the file-descriptor level.

Replacing ``sys.stdout`` would miss output from C extensions, subprocesses and
logging handlers that grabbed the stream before ``init()``. So fds 1 and 2 are
pointed at pipes; a reader thread copies every byte to the original terminal
(output still shows as usual) and hands complete lines to the run's log.
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
            pending += data
            *lines, pending = pending.split(b"\n")
            now = time.time()
            for line in lines:
                self._emit_in_pieces(line, now)
            while len(pending) > MAX_LINE:  # a line that goes on and on: ship it in pieces
                cut = _piece_end(pending, MAX_LINE)
                self._emit(pending[:cut], now)
                pending = pending[cut:]
        if pending:
            self._emit_in_pieces(pending, time.time())
        os.close(self.read_end)

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

    def restore(self, timeout: float) -> None:
        os.dup2(self.saved, self.fd)  # closes our pipe's write end held by fd
        self.thread.join(timeout)  # forked children may keep the pipe open: don't wait forever
        os.close(self.saved)


def _piece_end(raw: bytes, limit: int) -> int:
    """Where to cut ``raw`` at or before ``limit`` (> 0) so that no UTF-8 character is split:
    back over continuation bytes (``0b10xxxxxx``), at most 3. Bytes that are not UTF-8 are
    cut at ``limit``."""
    cut = limit
    while cut > limit - 3 and cut > 1 and raw[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut if raw[cut] & 0xC0 != 0x80 else limit


class ConsoleCapture:
    def __init__(self, sink: Callable[[LogLine], None]) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._tees = [_Tee(1, 1, sink), _Tee(2, 2, sink)]

    def stop(self, timeout: float = 2.0) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for tee in self._tees:
            tee.restore(timeout)
        self._tees = []
