"""Random bytes on the sidecar's socket, while a well-behaved writer logs through it.

A real ``pluto sidecar`` and a real server. Hypothesis sends random byte strings and valid
frame streams (HELLO, OPEN_RUN, CHUNK, UPDATE_RUN) with bytes flipped, inserted, deleted or
cut, several connections at once; every reply must be a well-formed frame of a kind the
sidecar sends. Meanwhile an SDK run logs through the same sidecar from a thread. What holds:
the sidecar never dies, ``/healthz`` and ``/readyz`` stay 200, and every point of the good
writer arrives exactly once.

Before its HELLO a client may announce at most 64 KiB (``connection.HELLO_MAX_BYTES``) and
has ``hello_timeout`` (10 s) for its whole first frame: announcing 16 MiB and then stalling,
or trickling a byte at a time, used to hold 16 MiB of the sidecar's memory per connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.server_process import ServerProcess
from support.sidecar_process import SidecarProcess

import pluto
from pluto import query
from pluto.wire import (
    FRAME_HEADER,
    FRAME_MAGIC,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Chunk,
    FrameError,
    FrameKind,
    Hello,
    RunCreate,
    RunUpdate,
    RunUpdateRequest,
    encode_frame,
    encode_msgpack,
    parse_frame_header,
)

FUZZ_PROJECT = "socket-fuzz"
GOOD_PROJECT = "socket-good"
REPLY_KINDS = {FrameKind.WELCOME, FrameKind.RUN, FrameKind.ACK, FrameKind.UPDATED,
               FrameKind.ERROR}
QUIET = ["--sys-interval", "0", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess,
                                                                     SidecarProcess]]:
    base = tmp_path_factory.mktemp("socket-fuzz")
    with ServerProcess(base / "data") as server, \
            SidecarProcess(base / "sidecar", server.url, extra_args=QUIET) as sidecar:
        yield server, sidecar


# -- frames ---------------------------------------------------------------------------


def valid_stream(seq: int) -> bytes:
    """What a client says on a good day: HELLO, OPEN_RUN, a CHUNK, an UPDATE_RUN."""
    session = uuid.uuid4().hex
    chunk = Chunk(run=0, project=FUZZ_PROJECT, run_ref="fuzzed", session=session, seq=seq,
                  writer=9, keys=["fuzz", "other"], key_index=[0, 1, 0], steps=[seq, seq, seq + 1],
                  values=[1.0, 2.0, 3.0], times=[time.time()] * 3)
    return b"".join([
        encode_frame(FrameKind.HELLO, 1, encode_msgpack(
            Hello(protocol=PROTOCOL_VERSION, session=session, writer=9, pid=os.getpid()))),
        encode_frame(FrameKind.OPEN_RUN, 2, encode_msgpack(
            RunCreate(project=FUZZ_PROJECT, run_id="fuzzed"))),
        encode_frame(FrameKind.CHUNK, 3, encode_msgpack(chunk)),
        encode_frame(FrameKind.UPDATE_RUN, 4, encode_msgpack(RunUpdateRequest(
            project=FUZZ_PROJECT, run_ref="fuzzed", update=RunUpdate(add_tags=["t"])))),
    ])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid stream with a few bytes flipped, inserted or deleted, maybe cut short."""
    data = bytearray(valid_stream(draw(st.integers(0, 2**40))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xFF]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw(st.integers(1, 8))]
        if not data:
            break
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """A HELLO, then well-framed payloads of random bytes under any kind."""
    hello = encode_frame(FrameKind.HELLO, 1, encode_msgpack(
        Hello(protocol=PROTOCOL_VERSION, session=uuid.uuid4().hex, writer=9, pid=1)))
    frames = [encode_frame(FrameKind(draw(st.integers(1, 9))), i, draw(st.binary(max_size=64)))
              for i in range(draw(st.integers(1, 4)))]
    return hello + b"".join(frames)


raw_bytes = st.binary(max_size=256)
header_then_bytes = st.builds(
    lambda kind, length, tail: FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, kind, 1, length)
    + tail,
    st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=64))
inputs = st.one_of(raw_bytes, mutated(), framed_garbage(), header_then_bytes)


def exchange(path: Path, payloads: list[bytes], timeout: float = 8.0) -> list[bytes]:
    """Send each payload on a connection of its own, all open at once; what came back."""
    socks = []
    for _ in payloads:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
        socks.append(sock)
    try:
        for sock, payload in zip(socks, payloads, strict=True):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        replies = []
        for sock in socks:
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while piece := sock.recv(65536):
                    received += piece
            replies.append(received)
        return replies
    finally:
        for sock in socks:
            sock.close()


def parse_replies(data: bytes) -> list[tuple[FrameKind, bytes]]:
    """Every frame in ``data``; fails on anything that is not a whole, well-formed frame."""
    frames = []
    while data:
        assert len(data) >= FRAME_HEADER.size, f"a cut header: {data!r}"
        kind, _, length = parse_frame_header(data[:FRAME_HEADER.size])
        payload = data[FRAME_HEADER.size:FRAME_HEADER.size + length]
        assert len(payload) == length, "a cut reply"
        assert kind in REPLY_KINDS, kind
        if kind is FrameKind.ERROR:
            error = msgspec.msgpack.decode(payload, type=FrameError)
            assert error.detail, error
        frames.append((kind, payload))
        data = data[FRAME_HEADER.size + length:]
    return frames


class GoodWriter:
    """An SDK run logging through the sidecar from a thread, one step every few ms."""

    def __init__(self, sidecar: SidecarProcess, directory: Path) -> None:
        self.run = pluto.init(project=GOOD_PROJECT, run_id=f"good-{uuid.uuid4().hex[:8]}",
                              dir=directory, settings={
                                  "console": False, "sidecar_socket": str(sidecar.socket),
                                  "flush_interval": 0.05, "finish_timeout": 60})
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._log, daemon=True)
        self._thread.start()

    def _log(self) -> None:
        while not self._stop.is_set():
            self.run.log({"good": float(self.steps), "also": -float(self.steps)})
            self.steps += 1
            time.sleep(0.003)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def assert_alive(sidecar: SidecarProcess) -> None:
    assert sidecar.proc is not None and sidecar.proc.poll() is None, sidecar.logs()[-3000:]
    for path in ("/healthz", "/readyz"):
        reply = httpx.get(sidecar.health_url + path, timeout=5)
        assert reply.status_code == 200, (path, reply.text)


# -- the fuzz ---------------------------------------------------------------------------


def test_random_bytes_never_hurt_the_sidecar_or_a_good_writer(
    pod: tuple[ServerProcess, SidecarProcess], tmp_path: Path,
) -> None:
    server, sidecar = pod
    writer = GoodWriter(sidecar, tmp_path / "good")
    seen_kinds: set[FrameKind] = set()

    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payloads=st.lists(inputs, min_size=1, max_size=4))
    # A whole valid stream beside garbage, always: in about 1 run in 15 the strategies
    # alone never left a CHUNK intact, and the ACK path went untested.
    @example(payloads=[valid_stream(1), FRAME_HEADER.pack(FRAME_MAGIC, 0, 0, 0, 0)])
    def check(payloads: list[bytes]) -> None:
        for reply in exchange(sidecar.socket, payloads):
            seen_kinds.update(kind for kind, _ in parse_replies(reply))
        assert_alive(sidecar)

    try:
        check()
        assert_alive(sidecar)
    finally:
        writer.stop()
    # The fuzz reached past the HELLO: frames were accepted, and others refused.
    assert {FrameKind.WELCOME, FrameKind.ERROR, FrameKind.ACK} <= seen_kinds, seen_kinds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.run.finish()
    assert writer.steps > 100
    deadline = time.monotonic() + 60
    while True:
        rows = query.get_metrics(writer.run.run_id or "", project=GOOD_PROJECT,
                                 url=server.url)
        got = {key: [row.step for row in series] for key, series in rows.items()}
        if got.get("good") == list(range(writer.steps)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == {"good": list(range(writer.steps)), "also": list(range(writer.steps))}
    assert [row.value for row in rows["good"]] == [float(s) for s in range(writer.steps)]
    assert_alive(sidecar)


# -- the first frame ---------------------------------------------------------------------


def test_a_big_first_frame_is_refused_before_any_memory_is_taken(
    pod: tuple[ServerProcess, SidecarProcess],
) -> None:
    """40 connections announce a 16 MiB first frame (the limit after HELLO) and stall: each
    is told at once that a first frame is at most 64 KiB, and closed; the sidecar's memory
    does not grow by 40 x 16 MiB."""
    _, sidecar = pod
    assert sidecar.proc is not None
    rss_before = rss_kib(sidecar.proc.pid)
    header = FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, FrameKind.HELLO, 1,
                               MAX_FRAME_BYTES)
    socks = []
    for _ in range(40):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(sidecar.socket))
        sock.sendall(header + b"\x00" * 100)  # and then nothing: stalled mid-frame
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:
        reply = b""
        while piece := sock.recv(65536):  # the sidecar closes it
            reply += piece
        [(kind, payload)] = parse_replies(reply)
        error = msgspec.msgpack.decode(payload, type=FrameError)
        assert kind is FrameKind.ERROR and error.fatal, error
        assert (f"frame of {MAX_FRAME_BYTES} bytes before HELLO is larger than the limit of "
                f"{64 * 1024}") in error.detail, error.detail
        sock.close()
    assert time.monotonic() - started < 3.0  # refused at once, not after a timeout
    assert rss_kib(sidecar.proc.pid) - rss_before < 64 * 1024  # not 40 x 16 MiB
    assert_alive(sidecar)


def test_a_first_frame_trickled_a_byte_at_a_time_is_cut_off_at_the_hello_timeout(
    pod: tuple[ServerProcess, SidecarProcess],
) -> None:
    """The hello timeout (10 s) covers the whole first frame, not only its header: a client
    that sends a header announcing 60 KiB and then a byte every 50 ms is closed after 10 s
    (it used to be read for as long as it kept trickling), and others are served meanwhile."""
    _, sidecar = pod
    header = FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, FrameKind.HELLO, 1, 60 * 1024)
    errors: list[tuple[float, FrameError | str]] = []

    def trickle() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(str(sidecar.socket))
        started = time.monotonic()
        try:
            for byte in header:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
            while time.monotonic() - started < 20:
                sock.sendall(b"\x00")
                time.sleep(0.05)
            errors.append((time.monotonic() - started, "never closed"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        with contextlib.suppress(OSError):
            while piece := sock.recv(65536):
                reply += piece
        waited = time.monotonic() - started
        frames = parse_replies(reply) if reply else []
        if frames:
            errors.append((waited, msgspec.msgpack.decode(frames[0][1], type=FrameError)))
        else:
            errors.append((waited, "closed without an ERROR frame"))
        sock.close()

    threads = [threading.Thread(target=trickle) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    for _ in range(3):  # a good client is served while they trickle
        [reply] = exchange(sidecar.socket, [valid_stream(7)])
        assert FrameKind.WELCOME in [kind for kind, _ in parse_replies(reply)]
    for thread in threads:
        thread.join(30)
    assert len(errors) == 3, errors
    for waited, error in errors:
        assert isinstance(error, FrameError), error
        assert error.fatal and "no HELLO within 10s" in error.detail, error
        assert 9.0 <= waited <= 13.0, waited
    assert_alive(sidecar)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
