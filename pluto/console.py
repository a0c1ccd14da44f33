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
            if len(pending) > MAX_LINE:
                lines.append(pending)
                pending = b""
            now = time.time()
            for line in lines:
                self._emit(line, now)
        if pending:
            self._emit(pending, time.time())
        os.close(self.read_end)

    def _emit(self, raw: bytes, at: float) -> None:
        try:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            self.sink(LogLine(time=at, stream=self.stream_id, line=text[:MAX_LINE]))
        except Exception:  # a log line must never take the pump down
            pass

    def restore(self, timeout: float) -> None:
        os.dup2(self.saved, self.fd)  # closes our pipe's write end held by fd
        self.thread.join(timeout)  # forked children may keep the pipe open: don't wait forever
        os.close(self.saved)


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
