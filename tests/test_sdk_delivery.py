"""Delivery promises of the SDK, against a real server that goes away and comes back.

What ``log()`` accepted reaches the server exactly once: through an outage,
through a ``finish()`` that gave up (the leftover is adopted by the next
``init()`` in the same ``dir``), and through a SIGKILL of the logging process.
Console capture works at the file-descriptor level, so output of ``print``,
raw ``os.write``, child processes and pre-configured ``logging`` all becomes
the run's log, tagged with the rank, while still reaching the real terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from support.server_process import ServerProcess, create_api_key, revoke_api_key
from support.volumes import fill, small_tmpfs

import pluto
from pluto import query
from pluto.query import MetricRow

FAST: dict[str, Any] = {
    "console": False,
    "flush_interval": 0.05,
    "init_timeout": 15,
    "finish_timeout": 15,
}

Point = tuple[str, int, int]  # (key, step, writer)


pytestmark = pytest.mark.usefixtures("sdk_env")


@pytest.fixture
def server(shared_server: ServerProcess) -> Iterator[ServerProcess]:
    """The module's server, which a test may stop and start; it is running again after."""
    if not shared_server.running:
        shared_server.start()
    yield shared_server
    if not shared_server.running:
        shared_server.start()


def start(server: ServerProcess, spool_dir: Path, **settings: Any) -> pluto.Run:
    return pluto.init(
        project="delivery", dir=spool_dir, settings={**FAST, "url": server.url, **settings}
    )


def metrics(server: ServerProcess, run: int, **kwargs: Any) -> dict[str, list[MetricRow]]:
    """Raw (not downsampled) points per key."""
    return cast(dict[str, list[MetricRow]], query.get_metrics(run, url=server.url, **kwargs))


def assert_exactly_once(server: ServerProcess, run_id: int, expected: dict[Point, float]) -> None:
    """Every expected point is stored once with its value; nothing else is stored."""
    got = metrics(server, run_id)
    counts: Counter[Point] = Counter()
    values: dict[Point, float] = {}
    for key, rows in got.items():
        for row in rows:
            assert row.writer is not None
            point = (key, row.step, row.writer)
            counts[point] += 1
            values[point] = row.value
    duplicated = sorted(p for p, n in counts.items() if n > 1)
    missing = sorted(set(expected) - set(counts))
    unexpected = sorted(set(counts) - set(expected))
    assert not duplicated, f"{len(duplicated)} points stored twice, e.g. {duplicated[:5]}"
    assert not missing, f"{len(missing)} of {len(expected)} points lost, e.g. {missing[:5]}"
    assert not unexpected, f"points nobody logged: {unexpected[:5]}"
    assert values == expected


def spool_sessions(spool_dir: Path) -> list[Path]:
    root = spool_dir / "spool"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


# -- outages --------------------------------------------------------------------------


def test_a_full_spool_volume_holds_log_back_and_loses_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The SDK's spool volume is full while the server is away, and more is logged than the
    spool may hold in memory: the chunk that fits nowhere is kept (it used to be dropped,
    with only a logged exception), ``log()`` is held back once its buffer is full, and when
    the server and the space return every point arrives exactly once."""
    with small_tmpfs(tmp_path / "volume", 512 * 1024) as volume:
        run = start(server, volume / "pluto", max_buffered_calls=500, max_chunk_points=1000)
        run._pipeline.spool.held_max_bytes = 20_000  # instead of 64 MiB: full sooner
        server.stop()
        filler = fill(volume / "filler")
        steps = 4000  # 40,000 points: far beyond 20 KB held and 500 buffered calls

        def log_all() -> None:
            for step in range(steps):
                run.log({f"k{j}": step + j / 16 for j in range(10)}, step=step)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "cannot write to the spool"
            logger = threading.Thread(target=log_all, daemon=True)
            logger.start()
            logger.join(3.0)
            assert logger.is_alive(), "log() was not held back by a full spool volume"
            server.start()
            filler.unlink()
            logger.join(60)
            pipeline = run._pipeline
            assert not logger.is_alive(), (
                "log() stayed blocked after space returned: "
                f"{len(pipeline.rows)} calls buffered, sender alive "
                f"{pipeline._thread.is_alive()}, held {pipeline.spool.held_bytes} bytes, "
                f"unspooled {pipeline._unspooled is not None}, last error "
                f"{pipeline.state.last_error}, free {shutil.disk_usage(volume).free}, "
                f"pending {pipeline.spool.pending_bytes} empty {pipeline.spool.empty} short "
                f"{pipeline.spool.short_of_space} acked {pipeline.spool.acked} files "
                f"{[(p.name, p.stat().st_size) for p in pipeline.spool.directory.iterdir()]}")
            run.finish()
        assert not run.undelivered_bytes
        expected = {(f"k{j}", step, 0): step + j / 16 for step in range(steps) for j in range(10)}
        assert_exactly_once(server, run.id, expected)


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_server_outage_mid_run_loses_and_duplicates_nothing(
    server: ServerProcess, tmp_path: Path, hard: bool
) -> None:
    run = start(server, tmp_path / "pluto")
    expected: dict[Point, float] = {}
    step = 0

    def log_for(seconds: float) -> None:
        nonlocal step
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            run.log({"loss": float(step), "acc": -float(step)})
            expected[("loss", step, 0)] = float(step)
            expected[("acc", step, 0)] = -float(step)
            step += 1
            time.sleep(0.002)

    log_for(0.3)
    if hard:
        server.kill()  # a batch may be applied with its answer lost: retried, not doubled
    else:
        server.stop()
    logged_before_outage = step
    log_for(1.0)  # the server is away: log() keeps going, the spool grows
    assert step > logged_before_outage + 100
    server.start()
    log_for(0.3)
    run.finish()
    assert not run.undelivered_bytes
    assert_exactly_once(server, run.id, expected)
    info = query.get_run(run.id, url=server.url)
    assert info.status is pluto.RunStatus.COMPLETED
    assert spool_sessions(tmp_path / "pluto") == []  # delivered spools are cleaned up


def test_finish_says_what_only_waited_in_memory_for_room_on_a_full_volume(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Server away and spool volume full when ``finish()`` gives up: what waited in memory
    is not in the spool, and the warning says so instead of promising the next init()
    sends it."""
    with small_tmpfs(tmp_path / "volume", 512 * 1024) as volume:
        run = start(server, volume / "pluto", finish_timeout=1.0)
        server.stop()
        filler = fill(volume / "filler")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(300):
                run.log({f"k{j}": step + j / 16 for j in range(10)}, step=step)
            run.finish()
        filler.unlink()
    in_memory = run._pipeline.unwritten_bytes
    assert in_memory > 0
    (leftover,) = [str(w.message) for w in caught if "could not deliver" in str(w.message)]
    assert f"{run.undelivered_bytes} bytes" in leftover
    assert (f"{in_memory} of them were still waiting in memory for room on the full volume"
            in leftover), leftover
    assert "lost when this process exits" in leftover


def test_finish_with_the_server_down_is_bounded_and_the_leftover_is_adopted(
    server: ServerProcess, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "pluto"
    run = start(server, spool_dir, finish_timeout=1.0)
    run.log({"early": 1.0})
    server.stop()
    expected: dict[Point, float] = {("early", 0, 0): 1.0}
    for step in range(1, 200):
        run.log({"late": float(step)})
        expected[("late", step, 0)] = float(step)

    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.finish()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 2.5, f"finish(finish_timeout=1) took {elapsed:.1f}s"

    assert run.undelivered_bytes > 0
    leftover = [str(w.message) for w in caught if "could not deliver" in str(w.message)]
    assert len(leftover) == 1, [str(w.message) for w in caught]
    assert f"{run.undelivered_bytes} bytes" in leftover[0]
    assert str(spool_dir) in leftover[0]  # says where the data is kept
    assert "in memory" not in leftover[0]  # all of it is on disk
    assert spool_sessions(spool_dir), "the undelivered data must stay on disk"

    server.start()
    adopter = start(server, spool_dir)  # a later init() in the same dir delivers it
    adopter.log({"own": 5.0})
    adopter.finish()
    assert_exactly_once(server, run.id, expected)
    assert_exactly_once(server, adopter.id, {("own", 0, 0): 5.0})
    assert spool_sessions(spool_dir) == []
    # The status finish() could not send travelled in the spool behind the data.
    assert "marked COMPLETED" in leftover[0]
    assert query.get_run(run.id, url=server.url).status == pluto.RunStatus.COMPLETED

    again = start(server, spool_dir)  # adopting once more finds nothing to resend
    again.finish()
    assert_exactly_once(server, run.id, expected)


def test_data_the_server_refuses_for_its_api_key_is_kept_not_set_aside(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A 401 is about the key, not the data: what met a revoked key stays in the spool (no
    dead letter), and a later run with a valid key delivers it, once."""
    server = server_factory(start=False, extra_args=["--auth"])
    old_key = create_api_key(server.data_dir, "revoked-mid-run")
    server.start()
    spool_dir = tmp_path / "pluto"
    run = start(server, spool_dir, api_key=old_key, finish_timeout=1.0)
    run.log({"early": 1.0})
    expected: dict[Point, float] = {("early", 0, 0): 1.0}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not query.get_metrics(
            run.id, url=server.url, api_key=old_key).get("early"):
        time.sleep(0.05)

    server.stop()  # the key is revoked (and the server's cache of keys goes with it)
    revoke_api_key(server.data_dir, old_key)
    new_key = create_api_key(server.data_dir, "after-rotation")
    server.start()
    for step in range(1, 100):
        run.log({"late": float(step)})
        expected[("late", step, 0)] = float(step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.finish()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "refused a chunk" in m], messages
    assert not (spool_dir / "dead-letter.msgpack").exists()
    assert [m for m in messages if "could not deliver" in m and "HTTP 401" in m], messages
    assert spool_sessions(spool_dir), "the refused data must stay on disk"

    adopter = start(server, spool_dir, api_key=new_key)
    adopter.finish()
    got = query.get_metrics(run.id, url=server.url, api_key=new_key)
    assert {("early", row.step, 0): row.value for row in got["early"]} | {
        ("late", row.step, 0): row.value for row in got["late"]} == expected
    assert sum(len(rows) for rows in got.values()) == len(expected)
    assert spool_sessions(spool_dir) == []


def test_a_large_leftover_spool_never_holds_the_new_runs_own_data_back(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The next ``init()`` in a dir delivers what an earlier process left, but after its
    own data: when the server goes away again before the leftover is through, the new
    run's points are in its spool (and said to be undelivered), not lost in memory."""
    spool_dir = tmp_path / "pluto"
    left = start(server, spool_dir, finish_timeout=0.5, flush_interval=0.2)
    server.stop()
    keys = [f"k{i}" for i in range(10)]
    for step in range(100_000):  # a million points for the next init() to deliver
        left.log(dict.fromkeys(keys, float(step)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left.finish()
    assert left.undelivered_bytes > 0
    server.start()

    run = start(server, spool_dir, finish_timeout=1.0)
    server.kill()  # away again, long before the leftover's million points are through
    for step in range(5):
        run.log({"own": float(step)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.finish()
    leftover = [str(w.message) for w in caught if "could not deliver" in str(w.message)]
    assert len(leftover) == 1 and run.undelivered_bytes > 0, [str(w.message) for w in caught]

    server.start()
    later = start(server, spool_dir, finish_timeout=120)
    later.finish()
    assert_exactly_once(server, run.id, {("own", step, 0): float(step) for step in range(5)})
    assert query.get_run(run.id, url=server.url).status == pluto.RunStatus.COMPLETED
    stored = metrics(server, left.id)
    assert sorted(stored) == keys and all(len(rows) == 100_000 for rows in stored.values())
    assert spool_sessions(spool_dir) == []


def test_a_leftover_spool_is_only_delivered_to_the_server_it_was_logged_to(
    server: ServerProcess, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Its chunks name runs by that server's numeric ids: sent to another server they would
    land in whatever run has those ids there. It waits, with a warning, for an init() with
    its server."""
    spool_dir = tmp_path / "pluto"
    left = start(server, spool_dir, finish_timeout=0.5)
    server.stop()
    for step in range(50):
        left.log({"loss": float(step)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left.finish()
    assert left.undelivered_bytes > 0

    other = server_factory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elsewhere = start(other, spool_dir)
        elsewhere.log({"own": 1.0})
        elsewhere.finish()
    said = [str(w.message) for w in caught if "is not sent to" in str(w.message)]
    assert len(said) == 1 and server.url in said[0] and other.url in said[0], said
    assert len(spool_sessions(spool_dir)) == 1  # the leftover stays
    assert sorted(metrics(other, elsewhere.id)) == ["own"]
    assert [r.run_id for r in query.list_runs("delivery", url=other.url)] == [elsewhere.run_id]

    server.start()
    home = start(server, spool_dir)
    home.finish()
    assert_exactly_once(server, left.id, {("loss", step, 0): float(step) for step in range(50)})
    assert spool_sessions(spool_dir) == []


def test_init_waits_for_a_server_that_comes_up_within_init_timeout(
    server: ServerProcess, tmp_path: Path
) -> None:
    server.stop()
    result: dict[str, Any] = {}

    def attach() -> None:
        try:
            result["run"] = start(server, tmp_path / "pluto", init_timeout=30)
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=attach)
    thread.start()
    time.sleep(1.0)
    server.start()
    thread.join(30)
    assert "error" not in result, result.get("error")
    run: pluto.Run = result["run"]
    run.log({"v": 1.0})
    run.finish()
    assert_exactly_once(server, run.id, {("v", 0, 0): 1.0})


KILLED_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import pluto
    run = pluto.init(project="delivery", dir=sys.argv[1],
                     settings={"flush_interval": 0.05, "console": False})
    print(json.dumps({"id": run.id}), flush=True)
    sys.stdin.readline()  # the test stops the server meanwhile
    for step in range(300):
        run.log({"a": float(step), "b": step * 2.0})
    time.sleep(1.5)  # the sender spools what was logged (and fails to send it)
    print("spooled", flush=True)
    time.sleep(600)
""")


def test_spool_of_a_sigkilled_process_is_delivered_by_the_next_init(
    server: ServerProcess, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    spool_dir = tmp_path / "pluto"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SCRIPT, str(spool_dir)],
        env=env_for(server, RANK="1"),
        cwd=tmp_path,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        run_id = json.loads(proc.stdout.readline())["id"]
        server.stop()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "spooled"
        os.kill(proc.pid, signal.SIGKILL)  # no atexit, no finish(): only the spool is left
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert spool_sessions(spool_dir)

    server.start()
    assert metrics(server, run_id) == {}
    adopter = start(server, spool_dir)
    adopter.finish()
    expected: dict[Point, float] = {}
    for step in range(300):
        expected[("a", step, 1)] = float(step)
        expected[("b", step, 1)] = step * 2.0
    assert_exactly_once(server, run_id, expected)
    assert spool_sessions(spool_dir) == []


# -- console capture --------------------------------------------------------------------

CONSOLE_SCRIPT = textwrap.dedent("""
    import json, logging, os, subprocess, sys
    # A handler bound to sys.stderr before init(): only fd-level capture sees its output.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import pluto
    run = pluto.init(project="delivery", dir=sys.argv[1],
                     settings={"flush_interval": 0.05, "console": sys.argv[2] == "on"})
    print("py-print-line")
    os.write(1, b"raw-fd-line\\n")
    subprocess.run(["echo", "child-echo-line"], check=True)
    print("stderr-line", file=sys.stderr)
    logging.getLogger("train").info("logging-line")
    run.log({"x": 1.0})
    run.finish()
    print(json.dumps({"id": run.id}), flush=True)
    print("after-finish-line", flush=True)
""")

STDOUT_LINES = ["py-print-line", "raw-fd-line", "child-echo-line"]
STDERR_LINES = ["stderr-line", "logging-line"]


def run_console_script(
    server: ServerProcess, env_for: Callable[..., dict[str, str]], tmp_path: Path, console: str
) -> tuple[int, subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT, str(tmp_path / "pluto"), console],
        env=env_for(server, RANK="2"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout.splitlines()[-2])["id"]
    return run_id, proc


def test_console_output_becomes_the_runs_log_and_still_prints(
    shared_server: ServerProcess, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    before = time.time()
    run_id, proc = run_console_script(shared_server, env_for, tmp_path, "on")
    after = time.time()
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    for line in STDOUT_LINES:
        assert line in out  # still printed as usual
    for line in STDERR_LINES:
        assert line in err

    records = query.get_logs(run_id, url=shared_server.url)
    by_line = {record.line: record for record in records}
    for line in STDOUT_LINES + STDERR_LINES:
        assert line in by_line, f"{line!r} missing from the run's log: {sorted(by_line)}"
        record = by_line[line]
        assert record.writer == 2  # the rank
        assert record.stream == (1 if line in STDOUT_LINES else 2)
        assert before <= record.time <= after
    assert "after-finish-line" not in by_line
    assert sum(record.line == "py-print-line" for record in records) == 1
    assert [r.line for r in records if r.line in STDOUT_LINES] == STDOUT_LINES  # in order
    assert query.get_logs(run_id, url=shared_server.url, writer=0) == []


def test_console_capture_off_ships_nothing(
    shared_server: ServerProcess, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    run_id, proc = run_console_script(shared_server, env_for, tmp_path, "off")
    for line in STDOUT_LINES:
        assert line in proc.stdout.splitlines()
    for line in STDERR_LINES:
        assert line in proc.stderr.splitlines()
    assert query.get_logs(run_id, url=shared_server.url) == []
    assert [r.value for r in metrics(shared_server, run_id)["x"]] == [1.0]


FORK_SCRIPT = textwrap.dedent("""
    import json, sys
    import pluto
    settings = {"flush_interval": 0.05}
    parent = pluto.init(project="delivery", dir=sys.argv[1], settings=settings)
    print("parent-line")
    for step in range(5):
        parent.log({"loss": 1.0 / (step + 1)})
    parent.finish()
    fork = pluto.init(project="delivery", dir=sys.argv[1], settings=settings,
                      fork_run_id=parent.id, fork_step=2)
    print("fork-line")
    fork.log({"loss": 0.0})
    fork.finish()
    print(json.dumps({"parent": parent.id, "fork": fork.id}), flush=True)
""")


def test_a_fork_starts_with_a_clean_log(
    shared_server: ServerProcess, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(tmp_path / "pluto")],
        env=env_for(shared_server),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout.splitlines()[-1])
    parent_lines = [r.line for r in query.get_logs(ids["parent"], url=shared_server.url)]
    fork_lines = [r.line for r in query.get_logs(ids["fork"], url=shared_server.url)]
    assert "parent-line" in parent_lines and "fork-line" not in parent_lines
    assert fork_lines == ["fork-line"]


# -- ranks sharing one spool dir ------------------------------------------------------------

SHARED_DIR_WORKER = textwrap.dedent("""
    import json, os, sys, time, warnings
    import pluto
    spool_dir, stop_file, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < deadline and not os.path.exists(stop_file):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run = pluto.init(project="shared-dir", dir=spool_dir,
                                 settings={"console": False, "flush_interval": 0.02,
                                           "finish_timeout": 3})
                run.log({"x": 1.0})
                run.finish()
            record = {"id": run.id, "warnings": [str(w.message) for w in caught]}
        except Exception as exc:
            record = {"error": repr(exc)}
        print(json.dumps(record), flush=True)
        if "error" in record or record["warnings"]:
            open(stop_file, "w").close()  # one failure is enough: stop everyone
""")


def test_processes_sharing_a_dir_do_not_disturb_each_other(
    server_factory: Callable[..., ServerProcess],
    env_for: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """Four processes start and finish runs over and over in one ``dir`` for a few
    seconds (as torchrun ranks sharing a working directory do): every init succeeds,
    every finish delivers and completes its run, nothing warns."""
    server = server_factory()
    stop_file = tmp_path / "stop"
    deadline = time.time() + 8
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SHARED_DIR_WORKER,
                str(tmp_path / "pluto"),
                str(stop_file),
                str(deadline),
            ],
            env=env_for(server),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    records: list[dict[str, Any]] = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        records += [json.loads(line) for line in out.splitlines()]
    failures: list[Any] = [r for r in records if "error" in r or r["warnings"]]
    status = {info.id: info for info in query.list_runs("shared-dir", url=server.url)}
    for record in records:
        if "id" in record:
            info = status[record["id"]]
            points = info.last_step == 0 and info.first_step == 0  # one point, at step 0
            if info.status is not pluto.RunStatus.COMPLETED or not points:
                failures.append((info.display_id, info.status.value, info.last_step))
    assert not failures, f"{len(failures)} of {len(records)} cycles went wrong: {failures[:3]}"
    assert len(records) >= 20  # the processes really did overlap for a while
