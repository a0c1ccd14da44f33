"""The sidecar's spool volume fills up (issue 7): a real 4 MiB tmpfs under the spool, with
the server away, while 4 writers log about 2.5 times what it holds. And a spool write or
fsync that fails otherwise (a real ``EFBIG``; an ``EIO`` from fsync(2) through libfiu): the
sidecar exits 74 and a restart loses nothing.

What must hold: back-pressure, not loss (the writers are slowed, none crashes, the SDK's
reconnects while the sidecar does not read it lose and duplicate nothing); the gauge
``pluto_sidecar_spool_volume_full`` says so and the log says it once, not once a frame or a
retry; the spool's segments on the full volume hold whole records only (a sidecar restarted
on it cuts nothing); and once the server is back the spool drains, space returns, the log
says so, and the server holds every point exactly once.

The full volume needs a tmpfs mount (root or ``CAP_SYS_ADMIN``, as in CI); skipped, saying
why, without one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.chaos import (
    SIDECAR_ARGS,
    ServerFactory,
    Writers,
    assert_exactly_once,
    assert_stored_in_order,
    expected_points,
    run_status,
    sidecar_metric,
    start_writers,
    stored_points,
    wait_delivered,
)
from support.sidecar_process import SidecarProcess
from support.volumes import free_bytes, small_tmpfs

from pluto.spool import HEADER
from pluto_sidecar.queue import ROOM_QUIET_SECONDS

VOLUME_BYTES = 4 * 1024 * 1024
FULL = "spool volume full"
ROOM = "spool volume has room again"
#: The SDK's socket timeout in the writers: short, so that while the sidecar holds them back
#: each one times out and reconnects (and resends) several times within the test.
WRITER_TIMEOUT = 3.0


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "volume", VOLUME_BYTES) as path:
        yield path


def events(sidecar: SidecarProcess, prefix: str) -> list[dict[str, object]]:
    """The sidecar's log events (every process it ran as) whose text starts with ``prefix``."""
    return [e for e in sidecar.events() if str(e.get("event", "")).startswith(prefix)]


def scan_segments(spool: Path) -> tuple[int, int]:
    """(records, bytes) in the spool's segment files, checking that each file is whole
    records end to end: every header's CRC matches its payload and the last record ends
    where the file ends (nothing torn, nothing partial left by a failed write)."""
    records = size = 0
    for segment in sorted(spool.glob("*.seg")):
        data = segment.read_bytes()
        offset = 0
        while offset < len(data):
            assert offset + HEADER.size <= len(data), \
                f"{segment.name}: a torn header at {offset} of {len(data)} bytes"
            length, crc = HEADER.unpack_from(data, offset)
            end = offset + HEADER.size + length
            assert end <= len(data), \
                f"{segment.name}: a torn record at {offset} ({length} bytes, file {len(data)})"
            assert zlib.crc32(data[offset + HEADER.size:end]) == crc, \
                f"{segment.name}: a corrupt record at {offset}"
            records += 1
            offset = end
        size += len(data)
    return records, size


def wait_metric(sidecar: SidecarProcess, name: str, wanted: float, timeout: float,
                writers: Writers) -> float:
    start = time.monotonic()
    while sidecar_metric(sidecar, name) != wanted:
        if time.monotonic() - start > timeout:
            pytest.fail(f"pluto_sidecar_{name} is not {wanted} after {timeout:.0f}s (it is "
                        f"{sidecar_metric(sidecar, name)}); sidecar log:\n"
                        f"{sidecar.logs()[-3000:]}\nwriter 0:\n{writers.log(0)}",
                        pytrace=False)
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.mark.timeout(180)
def test_spool_volume_full_holds_writers_back_and_recovers(
        server_factory: ServerFactory, volume: Path, tmp_path: Path) -> None:
    """Server away, 4 writers, a 4 MiB spool volume: full, held, stopped and restarted on
    the full volume, then drained once the server is up (see the module docstring)."""
    run_ref = "disk-full"
    server = server_factory(start=False)
    sidecar = SidecarProcess(tmp_path / "sidecar", server.url, extra_args=[
        *SIDECAR_ARGS, "--open-wait", "1", "--drain-seconds", "1"])
    sidecar.spool_dir = volume / "spool"  # the socket and the log stay off the small volume
    steps, keys = 12_000, 10
    expected = expected_points(range(4), steps, keys)
    writers: Writers | None = None
    try:
        sidecar.start()
        writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, keys=keys,
                                every=100, pause=0.03,
                                http_timeout=WRITER_TIMEOUT)
        writers.wait_ready()

        # 1. The volume fills: back-pressure, the gauge, one log line.
        filled_after = wait_metric(sidecar, "spool_volume_full", 1, 60, writers)
        held_since = time.monotonic()
        log_lines_before = len(sidecar.logs().splitlines())
        # Held back for three SDK timeouts: each writer times out waiting for its ACKs,
        # reconnects, its HELLO waits in turn, times out, and so on.
        while time.monotonic() - held_since < 3 * WRITER_TIMEOUT:
            assert sidecar_metric(sidecar, "spool_volume_full") == 1
            exited = [(rank, proc.returncode) for rank, proc in enumerate(writers.procs)
                      if proc.poll() is not None]
            assert not exited, (f"writers exited while the spool volume was full: {exited}\n"
                                + "\n".join(writers.log(rank) for rank, _ in exited))
            time.sleep(0.25)
        # A connection whose client gave up waiting goes (the client resends on its next):
        # at most each writer's first connection, blocked mid-stream, and its latest remain.
        connected = sidecar_metric(sidecar, "connected_clients")
        assert connected is not None and connected <= 8, connected
        full_lines = events(sidecar, FULL)
        assert len(full_lines) == 1, full_lines
        full = full_lines[0]
        assert full["level"] == "error", full
        assert full["spool"] == str(sidecar.spool_dir / "queue"), full
        assert "nothing is dropped" in str(full["event"]), full
        new_lines = sidecar.logs().splitlines()[log_lines_before:]
        assert len(new_lines) <= 10, "the sidecar's log floods while the volume is full:\n" \
            + "\n".join(new_lines[:20])
        assert free_bytes(volume) < 256 * 1024
        assert (sidecar_metric(sidecar, "oldest_unsent_age_seconds") or 0) > 0

        # 2. The spool on the full volume is whole records, and a restart cuts nothing.
        assert sidecar.stop() == 0, sidecar.logs()[-3000:]
        records, spooled = scan_segments(sidecar.spool_dir / "queue")
        assert records > 0 and spooled > VOLUME_BYTES // 2, (records, spooled)
        sidecar.start()
        opened = events(sidecar, "spool opened")[-1]
        assert opened["unsent_records"] == records and opened["torn_bytes_cut"] == 0, opened
        # The writers reconnect and resend what was not acknowledged: still no room.
        wait_metric(sidecar, "spool_volume_full", 1, 30, writers)
        assert writers.alive

        # 3. The server comes up: the spool drains, space returns, every writer finishes.
        server.start()
        back = time.monotonic()
        roomy_after = wait_metric(sidecar, "spool_volume_full", 0, 60, writers)
        reports = writers.wait(timeout=90)
        assert all(r["undelivered_bytes"] == 0 for r in reports), reports
        for rank in range(4):  # held back, reconnecting, resending: quietly
            said = writers.log(rank)
            assert "Traceback" not in said and len(said.splitlines()) <= 3, said
        waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()), timeout=60)
        context = (f"volume full {filled_after:.1f}s after the writers started, room again "
                   f"{roomy_after:.1f}s after the server came up, delivered "
                   f"{time.monotonic() - back:.1f}s after it (waited {waited:.1f}s after the "
                   f"writers finished); {records} records ({spooled} bytes) on the full "
                   f"volume")
        assert_exactly_once(stored_points(server, run_ref), expected, context)
        assert_stored_in_order(server, run_ref)
        assert run_status(server, run_ref) == "COMPLETED"
        # Each sidecar says once that the volume is full (filling again and again while the
        # backlog drains is the same episode); the second says once, after the volume has
        # kept room for a few seconds, that it has room again.
        deadline = time.monotonic() + ROOM_QUIET_SECONDS + 10
        while not events(sidecar, ROOM) and time.monotonic() < deadline:
            time.sleep(0.25)
        fulls = events(sidecar, FULL)
        rooms = events(sidecar, ROOM)
        assert len(fulls) == 2 and len(rooms) == 1, (context, fulls, rooms)
        assert rooms[0]["full_seconds"] > 0, rooms
        assert sidecar_metric(sidecar, "spool_volume_full") == 0, context
        assert sidecar_metric(sidecar, "dead_letters_total") == 0, context
    finally:
        if writers is not None:
            writers.kill()
        sidecar.stop()


# -- a spool write or fsync that fails (not for want of space) --------------------------


class FaultySidecar(SidecarProcess):
    """A sidecar started through ``wrapper``, a command that sets up a real fault and then
    runs it (an empty ``wrapper``: a plain sidecar, for the restart)."""

    wrapper: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        return [*self.wrapper, *super().argv]


#: The segment size limit of the EFBIG case: the spool's files may not grow past it.
FSIZE = 1024 * 1024
#: libfiu's failure point for fsync(2); ``failinfo`` is the errno it sets (5: EIO).
FSYNC_FAILS = "enable name=posix/io/sync/fsync,failinfo=5"


@pytest.mark.parametrize("fault", ["write EFBIG", "fsync EIO"])
def test_a_failed_spool_write_exits_74_and_a_restart_loses_nothing(
        server_factory: ServerFactory, tmp_path: Path, fault: str) -> None:
    """A spool write or fsync fails while 4 writers log, for a reason that is not a full
    volume: the sidecar logs one CRITICAL line and exits 74 at once (what was written since
    the last good fsync is in doubt, and nothing of it was acknowledged); the segments hold
    whole records; restarted without the fault, the sidecar recovers the spool, the writers
    resend what was not acknowledged, and the server holds every point exactly once.

    ``write EFBIG``: the sidecar runs under a 1 MiB ``RLIMIT_FSIZE`` (``prlimit``; Python
    ignores ``SIGXFSZ``), so a segment cannot grow past it. ``fsync EIO``: the sidecar runs
    under libfiu's POSIX preload library (``fiu-run -x``), and once the writers are logging
    ``fiu-ctrl`` makes every fsync(2) of the process fail with EIO, as a failing disk does.
    """
    ctrl = tmp_path / "fiu-ctrl"
    if fault == "write EFBIG":
        tools, wrapper, error = ["prlimit"], ("prlimit", f"--fsize={FSIZE}", "--"), "File too large"
    else:
        tools, wrapper, error = (["fiu-run", "fiu-ctrl"], ("fiu-run", "-x", "-f", str(ctrl)),
                                 "Input/output error")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} command to cause the fault (make fault-tools)")
    run_ref = f"fails-{fault.replace(' ', '-').lower()}"
    server = server_factory()
    sidecar = FaultySidecar(tmp_path / "sidecar", server.url, extra_args=SIDECAR_ARGS)
    sidecar.wrapper = wrapper
    steps, keys = 6000, 10  # about 5 MB of chunks in all
    expected = expected_points(range(4), steps, keys)
    writers: Writers | None = None
    try:
        sidecar.start()
        writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, keys=keys,
                                every=100, pause=0.03)
        writers.wait_ready()
        assert sidecar.proc is not None
        if fault == "fsync EIO":
            subprocess.run(["fiu-ctrl", "-f", str(ctrl), "-c", FSYNC_FAILS, str(sidecar.pid)],
                           check=True, timeout=30)
        deadline = time.monotonic() + 60
        while sidecar.proc.poll() is None:
            assert time.monotonic() < deadline, f"the sidecar did not meet the fault ({fault})"
            time.sleep(0.05)
        assert sidecar.proc.returncode == 74, sidecar.logs()[-3000:]
        (failed,) = events(sidecar, "spool fsync or write failed")
        assert failed["level"] == "critical" and failed["exit_code"] == 74, failed
        assert error in str(failed["error"]), failed
        records, size = scan_segments(sidecar.spool_dir / "queue")
        assert records > 0, (records, size)
        if fault == "write EFBIG":
            assert size <= FSIZE, (records, size)

        sidecar.wrapper = ()
        sidecar.start()
        opened = events(sidecar, "spool opened")[-1]
        assert opened["torn_bytes_cut"] == 0, opened
        reports = writers.wait(timeout=90)
        assert all(r["undelivered_bytes"] == 0 for r in reports), reports
        waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()), timeout=60)
        assert_exactly_once(stored_points(server, run_ref), expected,
                            f"{records} records on disk at the exit; waited {waited:.1f}s")
        assert_stored_in_order(server, run_ref)
        assert run_status(server, run_ref) == "COMPLETED"
    finally:
        if writers is not None:
            writers.kill()
        sidecar.stop()
