"""The sidecar hop: writer processes -> one ``pluto sidecar`` -> a real server.

    .venv/bin/python benchmarks/sidecar.py [--points 2000000] [--repeat 3]
                                           [--writers 1,4,8] [--postgres-url URL]
                                           [--sidecar-args '--batch-max-kb 2048']
                                           [--values pattern|noisy]

For 1, 4 and 8 writer processes (each ``pluto.init()`` with
``PLUTO_SIDECAR_SOCKET``, then ``--points / writers / 10`` calls of 10 scalars
with explicit steps, then ``finish()``) into one fresh sidecar per measurement:

- sidecar hop: points/s from the first ``log()`` of any writer until every
  writer's ``finish()`` returned, i.e. until the sidecar has every chunk in its
  durable spool (``finish()`` through a sidecar waits for its ACKs);
- end to end: points/s from the first ``log()`` until the server holds every
  point (the sidecar's ``points_sent_total`` reaches the total, polled every
  50 ms; checked afterwards by a query that must count exactly the points
  logged) and every writer's ``finish()`` has returned;
- the sidecar's and the server's peak RSS (psutil, sampled every 20 ms) and CPU seconds.

A "frame client" row isolates the sidecar from the SDK: one process sends the
pre-encoded CHUNK frames (the same ones as the raw-socket figure) through the
sidecar protocol (``SidecarTransport.deliver``, 8 frames in flight) and waits for
the ACKs, then for the server. A "server away" row sends the same frames to a
sidecar whose server does not answer: nothing is forwarded and no server runs, so
it is the sidecar's intake alone, without the forwarder and the server sharing the
machine's cores with it.

And the physical limit: the same bytes (CHUNK frames encoded as the SDK does,
``max_chunk_points`` points per frame) pushed through a raw Unix socket pair from
a writer process to a reader process that does nothing with them, in MB/s and the
equivalent points/s. For the breakdown, the same reader also writes what it
receives to a file next to the sidecar's spool and fsyncs once at the end ("raw
socket + write + fsync": no framing, no checks, no CRC): the least any hop that
acknowledges only what is on disk costs on this machine. Figures are medians of
``--repeat`` runs. Targets (issue 3):
>= 500,000 points/s end to end with 8 writers, sidecar hop >= 30 % of the raw
socket, sidecar RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import psutil
from _server import free_port, server_process
from rich.console import Console
from rich.table import Table

import pluto
from pluto import query
from pluto.settings import Settings
from pluto.transport.sidecar import SidecarTransport
from pluto.wire import Chunk, FrameKind, RunCreate, encode_frame, encode_msgpack

KEYS = [f"train/metric_{i}" for i in range(10)]
PROJECT = "bench-sidecar"
MB = 1024 * 1024


# -- a writer process ----------------------------------------------------------------


def value_rows(kind: str) -> list[list[float]]:
    """The values logged at successive steps (``len(KEYS)`` per step), repeated after the
    last row. "pattern": ``step * 0.001 + key`` over 1,000 steps, which compresses about
    60 times with zstd; "noisy": a random walk per key (a loss curve's jitter) over 10,000
    steps, every float's mantissa random, which compresses about 2.5 times, as real metrics
    do."""
    if kind == "pattern":
        return [[step * 0.001 + j for j in range(len(KEYS))] for step in range(1000)]
    rng = random.Random(0)
    level = [1.0] * len(KEYS)
    rows = []
    for _ in range(10_000):
        level = [value * (1 + rng.gauss(0, 0.01)) for value in level]
        rows.append(level)
    return rows


def writer_main(calls: int, values: str) -> int:
    """``sidecar.py --_writer CALLS VALUES``: init, say "ready", wait for "go", log, finish."""
    run = pluto.init(project=PROJECT, settings={"console": False})
    rows = value_rows(values)
    payloads = [dict(zip(KEYS, row, strict=True)) for row in rows]
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    cpu = time.process_time()  # this process, every thread: log() calls and packing
    for step in range(calls):
        run.log(payloads[step % len(payloads)], step=step)
    logged = time.time()
    run.finish()
    print(f"{start} {logged} {time.time()} {run.undelivered_bytes} "
          f"{time.process_time() - cpu}", flush=True)
    return 0


# -- one measurement -------------------------------------------------------------------


@dataclass
class Measurement:
    writers: int
    points: int
    hop_seconds: float  # first log() -> every finish() returned (all spooled by the sidecar)
    e2e_seconds: float  # first log() -> the server holds every point
    log_seconds: float  # first log() -> last writer's last log() call
    rss_peak: int
    cpu_seconds: float  # the sidecar's
    writers_cpu: float = 0.0  # all writer processes together, first log() to finish()
    server_cpu: float = 0.0  # the server's, over the same span (until it holds every point)
    server_rss_peak: int = 0  # the server's peak RSS over the same span
    sent_bytes: float = 0.0  # the sidecar's ingest bodies, as sent (compressed)

    @property
    def hop_rate(self) -> float:
        return self.points / self.hop_seconds

    @property
    def e2e_rate(self) -> float:
        return self.points / self.e2e_seconds


class Sampler(threading.Thread):
    """Peak RSS of a process, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._halt.wait(0.02)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def metric(health: str, name: str) -> float:
    text = httpx.get(health + "/metrics", timeout=5).text
    wanted = f"pluto_sidecar_{name} "
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[1])
    raise RuntimeError(f"the sidecar does not report {name}")


def sent_bytes(health: str) -> float:
    """Bytes of ingest bodies the sidecar sent, compressed, whatever their coding."""
    text = httpx.get(health + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pluto_sidecar_bytes_sent_total{"))


#: What the writers and the frame client log (``--values``).
VALUES: list[str] = ["pattern"]
#: More ``pluto sidecar`` flags for every sidecar started (``--sidecar-args``).
SIDECAR_FLAGS: list[str] = []


def start_sidecar(url: str, directory: Path, *extra: str,
                  ) -> tuple[subprocess.Popen[bytes], Path, str]:
    sock = directory / "pluto.sock"
    port = free_port()
    health = f"http://127.0.0.1:{port}"
    log = open(directory / "sidecar.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "pluto", "sidecar", "--socket", str(sock), "--spool-dir",
         str(directory / "spool"), "--server", url, "--health-port", str(port),
         "--sys-interval", "0", "--log-level", "WARNING", *SIDECAR_FLAGS, *extra],
        stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
    log.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(health + "/readyz", timeout=1).status_code == 200:
                return proc, sock, health
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("sidecar did not start: "
                               + (directory / "sidecar.log").read_text()[-2000:])
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "MLOP_"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def measure(url: str, server_pid: int, writers: int, points: int) -> Measurement:
    calls = points // len(KEYS) // writers
    total = calls * len(KEYS) * writers
    run_ref = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="pluto-bench-sidecar-") as tmp:
        directory = Path(tmp)
        sidecar, sock, health = start_sidecar(url, directory)
        procs: list[subprocess.Popen[str]] = []
        try:
            for rank in range(writers):
                env = _clean_env(PLUTO_SIDECAR_SOCKET=str(sock), PLUTO_RUN_ID=run_ref,
                                 RANK=str(rank), PLUTO_DIR=str(directory / f"w{rank}"))
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--_writer", str(calls), VALUES[0]], env=env,
                    text=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a writer failed to start (exit {proc.wait()})")
            sampler = Sampler(sidecar.pid)
            server_sampler = Sampler(server_pid)
            cpu = psutil.Process(sidecar.pid).cpu_times()
            server_cpu = psutil.Process(server_pid).cpu_times()
            sampler.start()
            server_sampler.start()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            # End to end: poll the sidecar's count of points the server acknowledged.
            while metric(health, "points_sent_total") < total:
                if any(proc.poll() not in (None, 0) for proc in procs):
                    raise RuntimeError("a writer failed")
                time.sleep(0.05)
            e2e_end = time.time()
            sent = sent_bytes(health)
            server_after = psutil.Process(server_pid).cpu_times()
            server_rss = server_sampler.stop()
            times = []
            writers_cpu = 0.0
            for proc in procs:
                out, _ = proc.communicate(timeout=120)
                start, logged, finished, undelivered, used = out.split()
                if int(undelivered) or proc.returncode:
                    raise RuntimeError(f"a writer could not deliver: {out!r}")
                times.append((float(start), float(logged), float(finished)))
                writers_cpu += float(used)
            after = psutil.Process(sidecar.pid).cpu_times()
            rss = sampler.stop()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            stop(sidecar)
    first = min(t[0] for t in times)
    counted = sum(b.points for series in query.get_metrics(
        run_ref, project=PROJECT, url=url, buckets=1).values() for b in series)
    if counted != total:
        raise SystemExit(f"the server holds {counted} points, expected {total}")
    return Measurement(
        writers=writers, points=total,
        hop_seconds=max(t[2] for t in times) - first,
        e2e_seconds=max(e2e_end, max(t[2] for t in times)) - first,
        log_seconds=max(t[1] for t in times) - first,
        rss_peak=rss,
        cpu_seconds=(after.user + after.system) - (cpu.user + cpu.system),
        writers_cpu=writers_cpu,
        server_cpu=(server_after.user + server_after.system)
        - (server_cpu.user + server_cpu.system),
        server_rss_peak=server_rss,
        sent_bytes=sent,
    )


# -- the physical limit: the same frames through a raw Unix socket ----------------------


def chunk_payloads(points: int, run_ref: str) -> list[bytes]:
    """CHUNK payloads as the SDK encodes them for ``points`` points (10 keys per call)."""
    per_chunk = Settings().max_chunk_points
    calls = points // len(KEYS)
    payloads = value_rows(VALUES[0])
    frames = []
    session = uuid.uuid4().hex
    now = time.time()
    for seq, first in enumerate(range(0, calls, per_chunk // len(KEYS))):
        steps = range(first, min(calls, first + per_chunk // len(KEYS)))
        chunk = Chunk(
            run=0, project=PROJECT, run_ref=run_ref, session=session, seq=seq,
            writer=0, keys=list(KEYS),
            key_index=[j for _ in steps for j in range(len(KEYS))],
            steps=[step for step in steps for _ in KEYS],
            values=[v for step in steps for v in payloads[step % len(payloads)]],
            times=[now + step * 1e-6 for step in steps for _ in KEYS],
        )
        frames.append(encode_msgpack(chunk))
    return frames


def send_frames(transport: SidecarTransport, payloads: list[bytes]) -> float:
    """Seconds to send ``payloads`` as CHUNK frames, 8 in flight, until all are acknowledged
    (the sidecar holds them in its fsynced spool)."""
    start = time.perf_counter()
    for first in range(0, len(payloads), 8):
        transport.deliver(payloads[first:first + 8])
    return time.perf_counter() - start


def frames_through_sidecar(url: str, server_pid: int, points: int) -> Measurement:
    """The same CHUNK frames sent by a bare protocol client (no SDK, no packing) to a
    fresh sidecar: seconds until the sidecar acknowledged them all (all spooled) and
    until the server holds them all."""
    run_ref = uuid.uuid4().hex
    payloads = chunk_payloads(points, run_ref)
    with tempfile.TemporaryDirectory(prefix="pluto-bench-sidecar-") as tmp:
        sidecar, sock, health = start_sidecar(url, Path(tmp))
        try:
            transport = SidecarTransport(str(sock), session=uuid.uuid4().hex, writer=0)
            transport.open_run(RunCreate(project=PROJECT, run_id=run_ref), 15)
            sampler = Sampler(sidecar.pid)
            server_sampler = Sampler(server_pid)
            cpu = psutil.Process(sidecar.pid).cpu_times()
            server_cpu = psutil.Process(server_pid).cpu_times()
            sampler.start()
            server_sampler.start()
            start = time.perf_counter()
            hop_seconds = send_frames(transport, payloads)
            while metric(health, "points_sent_total") < points:
                time.sleep(0.05)
            stored = time.perf_counter()
            sent = sent_bytes(health)
            server_after = psutil.Process(server_pid).cpu_times()
            server_rss = server_sampler.stop()
            after = psutil.Process(sidecar.pid).cpu_times()
            rss = sampler.stop()
            transport.close()
        finally:
            stop(sidecar)
    return Measurement(writers=1, points=points, hop_seconds=hop_seconds,
                       e2e_seconds=stored - start, log_seconds=0.0, rss_peak=rss,
                       cpu_seconds=(after.user + after.system) - (cpu.user + cpu.system),
                       server_cpu=(server_after.user + server_after.system)
                       - (server_cpu.user + server_cpu.system),
                       server_rss_peak=server_rss, sent_bytes=sent)


def frames_with_the_server_away(points: int) -> float:
    """Seconds for the frame client's frames to be acknowledged by a sidecar whose server
    is away: its forwarder sends nothing and no server takes CPU, so this is the sidecar's
    intake alone (otherwise, on a small machine, the forwarder and the server share the
    cores with it)."""
    run_ref = uuid.uuid4().hex
    payloads = chunk_payloads(points, run_ref)
    with tempfile.TemporaryDirectory(prefix="pluto-bench-sidecar-") as tmp:
        away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        sidecar, sock, _ = start_sidecar(away, Path(tmp), "--drain-seconds", "0")
        try:
            transport = SidecarTransport(str(sock), session=uuid.uuid4().hex, writer=0)
            with warnings.catch_warnings():  # "run ... is pending": the server is away
                warnings.simplefilter("ignore", RuntimeWarning)
                transport.open_run(RunCreate(project=PROJECT, run_id=run_ref), 2)
            seconds = send_frames(transport, payloads)
            transport.close()
        finally:
            stop(sidecar)
    return seconds


def _raw_writer(sock: socket.socket, frames: list[bytes]) -> None:
    sock.recv(1)  # go
    for frame in frames:
        sock.sendall(frame)
    sock.close()


def raw_socket(frames: list[bytes], durable: bool = False) -> float:
    """Seconds to push ``frames`` from a writer process to a reader process (``durable``:
    which also writes them to a file and fsyncs it before the clock stops)."""
    total = sum(len(f) for f in frames)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    context = multiprocessing.get_context("fork")
    writer = context.Process(target=_raw_writer, args=(theirs, frames))
    writer.start()
    theirs.close()
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    received = 0
    sink = tempfile.NamedTemporaryFile(prefix="pluto-bench-raw-") if durable else None  # noqa: SIM115
    start = time.perf_counter()
    ours.sendall(b"g")
    while received < total:
        n = ours.recv_into(view)
        if not n:
            break
        if sink is not None:
            os.write(sink.fileno(), view[:n])
        received += n
    if sink is not None:
        os.fsync(sink.fileno())
    seconds = time.perf_counter() - start
    if sink is not None:
        sink.close()
    ours.close()
    writer.join()
    if received != total:
        raise RuntimeError(f"raw socket: received {received} of {total} bytes")
    return seconds


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_writer":
        raise SystemExit(writer_main(int(sys.argv[2]), sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2_000_000,
                        help="points per measurement, split among the writers")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--writers", default="1,4,8", help="writer counts, comma-separated")
    parser.add_argument("--postgres-url", help="also measure into this PostgreSQL database")
    parser.add_argument("--sidecar-args", default="", metavar="FLAGS",
                        help="more flags for each `pluto sidecar`, e.g. '--batch-max-kb 1024'")
    parser.add_argument("--values", choices=("pattern", "noisy"), default="pattern",
                        help="what is logged: a repeating pattern that compresses well "
                             "(default, as in earlier figures) or noisy floats as real "
                             "metrics are (see value_rows)")
    args = parser.parse_args()
    VALUES[0] = args.values
    counts = [int(n) for n in args.writers.split(",")]
    SIDECAR_FLAGS[:] = shlex.split(args.sidecar_args)
    console = Console(width=140)

    points = args.points // len(KEYS) * len(KEYS)
    frames = [encode_frame(FrameKind.CHUNK, i + 1, payload)
              for i, payload in enumerate(chunk_payloads(points, uuid.uuid4().hex))]
    frame_bytes = sum(len(f) for f in frames)
    bytes_per_point = frame_bytes / points
    raw_seconds = statistics.median(raw_socket(frames) for _ in range(max(3, args.repeat)))
    raw_mbs = frame_bytes / MB / raw_seconds
    raw_pps = points / raw_seconds
    durable_seconds = statistics.median(raw_socket(frames, durable=True)
                                        for _ in range(max(3, args.repeat)))
    durable_pps = points / durable_seconds

    alone_pps = points / statistics.median(frames_with_the_server_away(points)
                                           for _ in range(args.repeat))

    backends = [("SQLite", None)] + ([("PostgreSQL", args.postgres_url)]
                                     if args.postgres_url else [])
    results: dict[tuple[str, str], list[Measurement]] = {}
    for name, database_url in backends:
        with server_process(database_url) as (url, pid):
            measure(url, pid, 1, min(points, 100_000))  # warm up the server
            for writers in counts:
                results[(name, str(writers))] = [measure(url, pid, writers, points)
                                                 for _ in range(args.repeat)]
            results[(name, "frames")] = [frames_through_sidecar(url, pid, points)
                                         for _ in range(args.repeat)]

    table = Table(title=f"pluto sidecar: {points:,} points per run (10 scalars per log() "
                        f"call, {args.values} values), median of {args.repeat} runs")
    for column in ("server", "writers", "sidecar hop\npoints/s", "end to end\npoints/s",
                   "hop / raw\nsocket", "sidecar\npeak RSS", "server\npeak RSS",
                   "sidecar\nCPU s", "sent\nbytes/point",
                   "CPU s per 1M points\nwriters/sidecar/server"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for (name, label), runs in results.items():
        hop = statistics.median(m.hop_rate for m in runs)
        e2e = statistics.median(m.e2e_rate for m in runs)
        table.add_row(
            name, "1 frame client (no SDK)" if label == "frames" else label,
            f"{hop:,.0f}", f"{e2e:,.0f}", f"{hop / raw_pps:.1%}",
            f"{max(m.rss_peak for m in runs) / MB:.1f} MB",
            f"{max(m.server_rss_peak for m in runs) / MB:.1f} MB",
            f"{statistics.median(m.cpu_seconds for m in runs):.2f}",
            f"{statistics.median(m.sent_bytes / m.points for m in runs):.2f}",
            "/".join(f"{statistics.median(getattr(m, f) / m.points * 1e6 for m in runs):.2f}"
                     for f in ("writers_cpu", "cpu_seconds", "server_cpu")),
        )
    table.add_row("server away", "1 frame client (no SDK)", f"{alone_pps:,.0f}", "",
                  f"{alone_pps / raw_pps:.1%}", "", "", "", "", "")
    table.add_row("raw Unix socket", "1 writer process", f"{raw_pps:,.0f}", "", "100%", "",
                  "", "", "", "")
    table.add_row("raw socket + write + fsync", "1 writer process", f"{durable_pps:,.0f}", "",
                  f"{durable_pps / raw_pps:.1%}", "", "", "", "", "")
    console.print(table)
    console.print(f"raw Unix socket (writer process -> reader process, no processing): "
                  f"{frame_bytes / MB:.1f} MB of CHUNK frames ({len(frames)} frames, "
                  f"{bytes_per_point:.1f} bytes/point) at {raw_mbs:,.0f} MB/s = "
                  f"{raw_pps:,.0f} points/s")
    console.print(f"the same, written to a file and fsynced (the least a durable hop costs): "
                  f"{frame_bytes / MB / durable_seconds:,.0f} MB/s = {durable_pps:,.0f} points/s "
                  f"({durable_pps / raw_pps:.1%} of raw)")
    console.print("targets (issue 3): end to end with 8 writers >= 500,000 points/s; "
                  "sidecar hop >= 30% of raw; sidecar RSS <= 60 MB")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}, pluto {pluto.__version__}")
    for (name, label), runs in results.items():
        who = "frame client" if label == "frames" else f"{label} writer(s)"
        for m in runs:
            console.print(
                f"  {name} {who}: {m.points:,} points, log loop {m.log_seconds:.2f}s, all "
                f"spooled {m.hop_seconds:.2f}s, in the server {m.e2e_seconds:.2f}s; sidecar "
                f"{m.cpu_seconds:.2f} CPU s, peak RSS {m.rss_peak / MB:.1f} MB (server "
                f"{m.server_rss_peak / MB:.1f} MB); writers {m.writers_cpu:.2f} CPU s, "
                f"server {m.server_cpu:.2f} CPU s")


if __name__ == "__main__":
    main()
