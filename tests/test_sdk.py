"""``pluto.init()`` and ``Run``: the SDK's public behaviour against a real server.

Simple API behaviour runs in-process (console capture off, so pytest's own
output is left alone); anything that depends on process exit (atexit,
uncaught exceptions) runs in a real subprocess.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
import torch
from support.server_process import ServerProcess

import pluto
from pluto import query
from pluto.query import MetricRow

FAST: dict[str, Any] = {
    "console": False,
    "flush_interval": 0.05,
    "init_timeout": 10,
    "finish_timeout": 10,
}


pytestmark = pytest.mark.usefixtures("sdk_env")


@pytest.fixture
def start(
    shared_server: ServerProcess, project: str, tmp_path: Path
) -> Iterator[Callable[..., pluto.Run]]:
    """``start(**init_kwargs)``: ``pluto.init`` on the shared server, finished at teardown."""
    runs: list[pluto.Run] = []

    def _start(settings: dict[str, Any] | None = None, **kwargs: Any) -> pluto.Run:
        kwargs.setdefault("project", project)
        kwargs.setdefault("dir", tmp_path / "pluto")
        run = pluto.init(settings={**FAST, "url": shared_server.url, **(settings or {})}, **kwargs)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.finish()


def metrics(
    server: ServerProcess, run: pluto.Run | int, **kwargs: Any
) -> dict[str, list[MetricRow]]:
    run_id = run if isinstance(run, int) else run.id
    return cast(dict[str, list[MetricRow]], query.get_metrics(run_id, url=server.url, **kwargs))


def steps_of(rows: list[MetricRow]) -> list[int]:
    return [row.step for row in rows]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- init arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "missing"),
    [
        ({"fork_run_id": "ABC-1"}, "fork_step"),
        ({"fork_step": 5}, "fork_run_id"),
        ({"fork_run_id": "ABC-1", "fork_step": -1}, "fork_step"),
    ],
)
def test_fork_arguments_go_together_checked_before_any_io(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kwargs: dict[str, Any], missing: str
) -> None:
    monkeypatch.setenv("PLUTO_URL", closed_port_url())  # any I/O would wait, then fail
    started = time.monotonic()
    with pytest.raises(ValueError, match=missing):
        pluto.init(project="p", dir=tmp_path / "never", settings={"console": False}, **kwargs)
    assert time.monotonic() - started < 1.0
    assert not (tmp_path / "never").exists()  # no disk I/O either


def test_run_properties(
    shared_server: ServerProcess, start: Callable[..., pluto.Run], project: str
) -> None:
    run = start(
        name="baseline", config={"lr": 0.1, "opt": {"beta": 0.9}}, tags=["a", "b"], run_id="props-1"
    )
    assert isinstance(run.id, int)
    assert run.run_id == "props-1"
    assert run.resumed is False
    assert run.fork_run_id is None and run.fork_step is None
    assert re.fullmatch(r"[A-Z0-9]+-\d+", run.display_id), run.display_id
    assert run.url.startswith(shared_server.url) and run.display_id in run.url
    assert run.name == "baseline"
    assert run.project == project
    assert run.config == {"lr": 0.1, "opt": {"beta": 0.9}}
    assert sorted(run.tags) == ["a", "b"]

    stored = query.get_run(run.id, url=shared_server.url)
    assert (stored.display_id, stored.run_id, stored.name, stored.project) == (
        run.display_id,
        "props-1",
        "baseline",
        project,
    )
    assert stored.status is pluto.RunStatus.RUNNING
    by_display = query.get_run(run.display_id, url=shared_server.url)
    by_external = query.get_run("props-1", project=project, url=shared_server.url)
    assert by_display.id == by_external.id == run.id


def test_run_without_run_id_gets_a_fresh_one(start: Callable[..., pluto.Run]) -> None:
    first, second = start(), start()
    assert first.id != second.id
    assert first.run_id and second.run_id and first.run_id != second.run_id
    assert not first.resumed and not second.resumed


def test_explicit_run_id_attaches_like_the_env_var(
    monkeypatch: pytest.MonkeyPatch, start: Callable[..., pluto.Run]
) -> None:
    creator = start(run_id="shared-job")
    monkeypatch.setenv("PLUTO_RUN_ID", "shared-job")
    via_env = start()
    monkeypatch.delenv("PLUTO_RUN_ID")
    via_arg = start(run_id="shared-job")
    assert creator.id == via_env.id == via_arg.id
    assert [creator.resumed, via_env.resumed, via_arg.resumed] == [False, True, True]


def test_run_id_precedence(
    monkeypatch: pytest.MonkeyPatch, start: Callable[..., pluto.Run]
) -> None:
    monkeypatch.setenv("PLUTO_RUN_ID", "from-pluto-env")
    monkeypatch.setenv("MLOP_RUN_ID", "from-mlop-env")
    assert start(run_id="explicit").run_id == "explicit"
    assert start().run_id == "from-pluto-env"
    monkeypatch.delenv("PLUTO_RUN_ID")
    assert start().run_id == "from-mlop-env"


def test_resume_of_a_missing_run_is_rejected(start: Callable[..., pluto.Run]) -> None:
    with pytest.raises(pluto.RequestRejected) as caught:
        start(run_id="never-created", resume=True)
    assert caught.value.status_code == 404
    assert "never-created" in str(caught.value)


def test_a_run_whose_external_id_is_another_runs_numeric_id_gets_its_own_files(
    shared_server: ServerProcess, start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    """Job ids make good run ids: ``run_id="<N>"`` where N is the numeric id of another run
    of the project. The server reads an all-digit ref as a numeric id first, so the SDK
    names its run by its numeric id once known."""
    other = start(run_id="numbered-first")
    digits = start(run_id=str(other.id))
    assert digits.id != other.id
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert digits.log_file(notes) is not None
    listed = {run.id: httpx.get(f"{shared_server.url}/api/v1/runs/{run.id}/files").json()["files"]
              for run in (other, digits)}
    assert [f["name"] for f in listed[digits.id]] == ["notes.txt"]
    assert listed[other.id] == []


def test_the_operators_fork_variables_make_the_shared_run_that_fork(
    shared_server: ServerProcess, start: Callable[..., pluto.Run], project: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forked PlutoRun's pods carry PLUTO_FORK_RUN_ID / PLUTO_FORK_STEP next to
    PLUTO_RUN_ID: whichever rank opens the run first opens it as that fork."""
    parent = start(run_id="base", config={"lr": 0.1, "depth": 4}, tags=["base"])
    for step in range(10):
        parent.log({"loss": float(step)})
    parent.finish()
    monkeypatch.setenv("PLUTO_RUN_ID", "sweep-lr")
    monkeypatch.setenv("PLUTO_FORK_RUN_ID", "base")
    monkeypatch.setenv("PLUTO_FORK_STEP", "5")
    monkeypatch.setenv("PLUTO_FORK_INHERIT_TAGS", "true")
    first = start(config={"lr": 0.01})
    second = start()
    assert (first.resumed, second.resumed, second.id) == (False, True, first.id)
    stored = query.get_run(first.id, url=shared_server.url)
    assert (stored.forked_from, stored.fork_step) == (parent.id, 5)
    assert stored.config == {"lr": 0.01, "depth": 4} and stored.tags == ["base"]
    first.log({"loss": -1.0})
    assert first.step == 6  # after the fork step
    # An explicit run_id is the caller's own run: the pod's fork is not applied to it.
    own = start(run_id="not-the-pods")
    assert query.get_run(own.id, url=shared_server.url).forked_from is None

    monkeypatch.setenv("PLUTO_FORK_STEP", "five")
    with pytest.raises(ValueError, match="PLUTO_FORK_STEP must be a whole number"):
        start()
    monkeypatch.delenv("PLUTO_FORK_STEP")
    with pytest.raises(ValueError, match="PLUTO_FORK_STEP is not set"):
        start()


def test_a_sidecar_socket_nobody_serves_is_said_at_init_and_the_run_named_at_finish(
    tmp_path: Path,
) -> None:
    """A mistyped PLUTO_SIDECAR_SOCKET looks just like a sidecar that is not up yet: init()
    carries on (the SDK connects when one appears) but says so, and finish()'s warning
    names the pending run by its run id."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = pluto.init(project="p", run_id="typo-job", dir=tmp_path / "pluto", settings={
            "console": False, "sidecar_socket": str(tmp_path / "typo.sock"),
            "init_timeout": 0.3, "finish_timeout": 0.3})
        at_init = [str(w.message) for w in caught]
        run.log({"loss": 1.0})
        run.finish()
    assert run.pending and run.id == 0
    assert len(at_init) == 1, at_init
    assert "typo.sock" in at_init[0] and "unset PLUTO_SIDECAR_SOCKET" in at_init[0]
    (leftover,) = [str(w.message) for w in caught if "could not deliver" in str(w.message)]
    assert "for run 'typo-job'" in leftover, leftover


def test_resume_continues_after_the_last_step(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    first = start(run_id="long-job")
    for i in range(5):
        first.log({"loss": float(i)})
    first.finish()
    assert query.get_run(first.id, url=shared_server.url).status is pluto.RunStatus.COMPLETED

    resumed = start(run_id="long-job", resume=True)
    assert resumed.id == first.id and resumed.resumed is True
    assert query.get_run(first.id, url=shared_server.url).status is pluto.RunStatus.RUNNING
    resumed.log({"loss": 5.0})
    resumed.log({"loss": 6.0})
    resumed.finish()
    rows = metrics(shared_server, first)["loss"]
    assert [(r.step, r.value) for r in rows] == [(i, float(i)) for i in range(7)]

    by_display = start(run_id=first.display_id, resume=True)  # numeric/display id work too
    assert by_display.id == first.id and by_display.resumed
    by_display.log({"loss": 7.0})
    by_display.finish()
    assert steps_of(metrics(shared_server, first)["loss"]) == list(range(8))


def test_fork_reports_the_server_resolved_parent(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    root = start(name="exp", config={"lr": 0.1, "opt": {"beta": 0.9}}, tags=["root"])
    for _ in range(11):
        root.log({"loss": 1.0})  # steps 0-10
    root.finish()
    child = start(fork_run_id=root.display_id, fork_step=5, config={"lr": 0.01})
    assert (child.fork_run_id, child.fork_step) == (root.id, 5)
    assert child.name == "exp"  # forks share the experiment name
    assert child.config == {"lr": 0.01, "opt": {"beta": 0.9}}
    child.log({"loss": 2.0})  # a fork starts at fork_step + 1
    assert child.step == 6
    for _ in range(9):
        child.log({"loss": 2.0})  # steps 7-15
    child.finish()

    late = start(fork_run_id=child.id, fork_step=12)
    assert (late.fork_run_id, late.fork_step) == (child.id, 12)
    early = start(fork_run_id=str(child.id), fork_step=3)
    assert (early.fork_run_id, early.fork_step) == (root.id, 3)  # step 3 belongs to the root
    early.log({"loss": 3.0})
    early.finish()
    assert steps_of(metrics(shared_server, early)["loss"]) == [4]
    stitched = metrics(shared_server, early, lineage=True)["loss"]
    assert [(r.step, r.run) for r in stitched] == [*((s, root.id) for s in range(4)), (4, early.id)]


def test_tags_and_config_updates_reach_the_server(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    run = start(config={"model": {"width": 8}}, tags=["base"])
    run.add_tags("x")
    run.add_tags(["y", "z", "x"])
    run.remove_tags("x")
    run.remove_tags(["base"])
    run.update_config({"model": {"depth": 2}, "lr": 0.3})
    assert sorted(run.tags) == ["y", "z"]
    assert run.config == {"model": {"width": 8, "depth": 2}, "lr": 0.3}
    stored = query.get_run(run.id, url=shared_server.url)
    assert sorted(stored.tags) == ["y", "z"]
    assert stored.config == {"model": {"width": 8, "depth": 2}, "lr": 0.3}


# -- logging --------------------------------------------------------------------------


def test_step_counts_up_and_an_explicit_step_resets_it(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    run = start()
    assert run.step == -1
    for value in (0.0, 1.0, 2.0):
        run.log({"v": value})  # steps 0, 1, 2
    run.log({"v": 10.0}, step=10)
    run.log({"v": 11.0})  # 11
    run.log({"v": 30.0}, step=3)  # explicit steps may go back
    run.log({"v": 40.0})  # 4
    assert run.step == 4
    run.finish()
    rows = metrics(shared_server, run)["v"]
    assert sorted((r.step, r.value) for r in rows) == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
        (10, 10.0),
        (11, 11.0),
    ]


def test_timestamp_argument_is_stored(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    run = start()
    run.log({"v": 1.0}, timestamp=1_700_000_000.5)
    run.finish()
    assert metrics(shared_server, run)["v"][0].time == pytest.approx(1_700_000_000.5)


def test_writer_is_the_rank(
    monkeypatch: pytest.MonkeyPatch, shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    monkeypatch.setenv("RANK", "3")
    ranked = start()
    assert ranked.writer == 3
    ranked.log({"v": 1.0})
    monkeypatch.delenv("RANK")
    plain = start()
    assert plain.writer == 0
    monkeypatch.setenv("RANK", "\u00b9")  # isdigit() but not int(): ignored, not a crash
    assert start().writer == 0
    monkeypatch.delenv("RANK")
    chosen = start(settings={"writer": 7})
    assert chosen.writer == 7
    for run in (ranked, chosen):
        run.log({"v": 1.0})
        run.finish()
    assert [r.writer for r in metrics(shared_server, ranked)["v"]] == [3, 3]
    assert [r.writer for r in metrics(shared_server, chosen)["v"]] == [7]


def test_numbers_of_every_kind_are_accepted(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    run = start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these may warn
        run.log(
            {
                "torch0d": torch.tensor(1.5),
                "torch1": torch.tensor([2.5]),
                "np_f32": np.float32(0.25),
                "np_i64": np.int64(7),
                "int": 3,
                "float": 4.5,
            }
        )
    run.finish()
    got = {key: [r.value for r in rows] for key, rows in metrics(shared_server, run).items()}
    assert got == {
        "torch0d": [1.5],
        "torch1": [2.5],
        "np_f32": [0.25],
        "np_i64": [7.0],
        "int": [3.0],
        "float": [4.5],
    }


def test_non_numbers_warn_once_per_key_and_the_rest_is_logged(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    run = start()
    bad: dict[str, Any] = {
        "text": "hello",
        "flag": True,
        "nothing": None,
        "vector": torch.ones(3),
        "array": np.ones(3),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the SDK itself must de-duplicate
        for i in range(3):
            run.log({"loss": float(i), **bad})
    run.finish()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for key in bad:
        assert sum(repr(key) in m for m in messages) == 1, (key, messages)
    assert len(messages) == len(bad), messages
    got = metrics(shared_server, run)
    assert set(got) == {"loss"}
    assert [(r.step, r.value) for r in got["loss"]] == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_nan_and_inf_round_trip(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    run = start()
    run.log(
        {
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "t_nan": torch.tensor(float("nan")),
            "np_inf": np.float64("inf"),
        }
    )
    run.finish()
    got = {key: rows[0].value for key, rows in metrics(shared_server, run).items()}
    assert math.isnan(got["nan"]) and math.isnan(got["t_nan"])
    assert got["inf"] == math.inf and got["np_inf"] == math.inf
    assert got["ninf"] == -math.inf


# -- lifecycle --------------------------------------------------------------------------


def test_attaching_with_another_name_warns_and_keeps_the_stored_name(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    first = start(run_id="named", name="original")
    with pytest.warns(RuntimeWarning, match="original"):
        second = start(run_id="named", name="other")
    assert second.id == first.id and second.resumed
    assert second.name == "original"
    assert query.get_run(first.id, url=shared_server.url).name == "original"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = start(run_id="named", name="original")  # the same name: nothing to warn about
    assert same.id == first.id


def test_context_manager_completes_the_run(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    with start() as run:
        run.log({"v": 1.0})
    assert run.finished
    assert query.get_run(run.id, url=shared_server.url).status is pluto.RunStatus.COMPLETED
    assert [r.value for r in metrics(shared_server, run)["v"]] == [1.0]


def test_context_manager_fails_the_run_on_an_exception(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    with pytest.raises(ZeroDivisionError), start() as run:
        run.log({"v": 1.0})
        _ = 1 / 0
    assert query.get_run(run.id, url=shared_server.url).status is pluto.RunStatus.FAILED
    assert [r.value for r in metrics(shared_server, run)["v"]] == [1.0]


@pytest.mark.parametrize(("code", "status"), [
    (None, pluto.RunStatus.COMPLETED), (0, pluto.RunStatus.COMPLETED),
    (3, pluto.RunStatus.FAILED), ("bad input", pluto.RunStatus.FAILED),
    (143, pluto.RunStatus.TERMINATED), (130, pluto.RunStatus.TERMINATED)])
def test_sys_exit_in_the_context_manager_ends_the_run_by_its_code(
    shared_server: ServerProcess, start: Callable[..., pluto.Run], code: object,
    status: pluto.RunStatus,
) -> None:
    """``sys.exit()`` / ``sys.exit(0)`` is a script that ended well: it marked the run
    FAILED, as any other exception does."""
    with pytest.raises(SystemExit), start() as run:
        run.log({"v": 1.0})
        sys.exit(code)
    assert query.get_run(run.id, url=shared_server.url).status is status


def test_each_kind_of_bad_log_call_warns_once_and_a_skipped_call_takes_no_step(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    """Only the first bad call of a run used to warn: a later, different mistake was
    skipped in silence; and a call skipped for its data still took a step number."""
    run = start()
    run.log({"x": 1.0}, step=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.log({"x": 1.0}, step=-1)
        run.log({"x": 1.0}, step=1.5)
        run.log("not a mapping")  # type: ignore[arg-type]
        run.log(None)  # type: ignore[arg-type]  # the same kind as the one before
        run.log({"x": 2.0})
    said = [str(w.message) for w in caught if "pluto" in str(w.message)]
    assert len(said) == 3, said
    assert "2**63-1" in said[0] and "whole-number" in said[1] and "skipped" in said[2]
    run.finish()
    assert [(r.step, r.value) for r in metrics(shared_server, run)["x"]] == [(0, 1.0), (1, 2.0)]


FORKED_SCRIPT = """
import os, sys, warnings, multiprocessing as mp
import pluto

def work(i):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pluto.log({"worker": i}, step=i)
    return [str(w.message) for w in caught]

if __name__ == "__main__":
    run = pluto.init(project=sys.argv[2], dir=sys.argv[3],
                     settings={"url": sys.argv[1], "console": False})
    with mp.get_context("fork").Pool(2) as pool:
        said = pool.map(work, range(4))
    print("WORKER", said[0])
    if os.fork() == 0:  # a bare fork whose child exits the usual way (atexit runs)
        sys.exit(0)
    os.wait()
    run.log({"parent": 1.0}, step=0)
    run.finish()
    print("RUN", run.id)
"""


def test_logging_in_a_forked_child_says_it_is_not_delivered(
    shared_server: ServerProcess, project: str, tmp_path: Path
) -> None:
    """A fork's copy of the run has no sender thread: its points were dropped in silence,
    and a forked child that exited printed that its (nonexistent) data would be sent by the
    next init()."""
    done = subprocess.run([sys.executable, "-c", FORKED_SCRIPT, shared_server.url, project,
                           str(tmp_path / "pluto")], capture_output=True, text=True,
                          timeout=120, check=True)
    worker = next(line for line in done.stdout.splitlines() if line.startswith("WORKER"))
    assert "forked from the one that called pluto.init()" in worker, done.stdout
    assert "could not deliver" not in done.stderr, done.stderr
    run_id = int(done.stdout.split("RUN ")[1].split()[0])
    stored = query.get_metrics(run_id, url=shared_server.url)
    assert set(stored) == {"parent"}
    assert query.get_run(run_id, url=shared_server.url).status is pluto.RunStatus.COMPLETED


def test_a_dir_that_cannot_hold_the_spool_is_a_value_error_and_no_run_is_made(
    shared_server: ServerProcess, project: str, tmp_path: Path
) -> None:
    """Found after the run was opened, it was an ``OSError`` (not one init() documents) and
    the run stayed on the server, empty and RUNNING."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"PLUTO_DIR.*cannot hold pluto's local spool"):
        pluto.init(project=project, dir=blocker / "sub", settings={
            "url": shared_server.url, "console": False})
    with pytest.raises(pluto.RequestRejected, match="does not exist"):  # no run, no project
        query.list_runs(project, url=shared_server.url)


def test_module_level_log_and_finish_act_on_the_newest_run(
    shared_server: ServerProcess, start: Callable[..., pluto.Run]
) -> None:
    older = start()
    newer = start()
    assert pluto.current() is newer
    pluto.log({"v": 1.0})
    pluto.log({"v": 2.0}, step=5)
    pluto.finish()
    assert newer.finished and not older.finished
    assert pluto.current() is older
    assert query.get_run(newer.id, url=shared_server.url).status is pluto.RunStatus.COMPLETED
    assert query.get_run(older.id, url=shared_server.url).status is pluto.RunStatus.RUNNING
    assert [(r.step, r.value) for r in metrics(shared_server, newer)["v"]] == [(0, 1.0), (5, 2.0)]
    older.finish()
    assert metrics(shared_server, older) == {}


def test_init_with_the_server_down_names_the_url(tmp_path: Path) -> None:
    url = closed_port_url()
    started = time.monotonic()
    with pytest.raises(pluto.ServerUnavailable) as caught:
        pluto.init(
            project="p", dir=tmp_path, settings={"url": url, "init_timeout": 2, "console": False}
        )
    elapsed = time.monotonic() - started
    # It retries (with jittered backoff) rather than failing at once, and gives up
    # about when told to: never later than init_timeout plus one retry delay.
    assert 0.5 <= elapsed <= 4.0, f"init gave up after {elapsed:.1f}s with init_timeout=2"
    assert url in str(caught.value)
    # Nothing spooled for a run that never started (the spool's directory may be made).
    assert not [path for path in tmp_path.rglob("*") if not path.is_dir()]


def test_init_gives_up_within_init_timeout_on_a_server_that_never_answers(
        tmp_path: Path) -> None:
    """A server that takes the connection and never answers held init() for the whole HTTP
    timeout (30 s), whatever init_timeout said."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(pluto.ServerUnavailable, match="gave up after 2s"):
            pluto.init(project="p", dir=tmp_path, settings={
                "url": url, "init_timeout": 2, "http_timeout": 30, "console": False})
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert elapsed <= 4.0, f"init gave up after {elapsed:.1f}s with init_timeout=2"


@pytest.mark.parametrize("url", ["localhost:7300", "127.0.0.1:7300", "ftp://x", "",
                                 " http://127.0.0.1:7300", "http://[::1", "http://"])
def test_a_url_that_cannot_name_a_server_is_a_value_error_at_once(
        tmp_path: Path, url: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"PLUTO_URL .* is not a server URL.*http://HOST:PORT"):
        pluto.init(project="p", dir=tmp_path, settings={"url": url, "console": False})
    # No request, no retry for init_timeout (15 s): a typo is not an outage.
    assert time.monotonic() - started < 5.0


def test_module_level_log_before_init_warns() -> None:
    assert pluto.current() is None  # every other test finishes its runs
    with pytest.warns(RuntimeWarning, match="init"):
        pluto.log({"v": 1.0})
    pluto.finish()  # nothing to finish: a no-op, not an error


def test_module_level_log_after_the_run_finished_says_so(
    start: Callable[..., pluto.Run]
) -> None:
    """It said "before pluto.init()", to a script that had called it."""
    start().finish()
    with pytest.warns(RuntimeWarning, match="after every run of this process finished"):
        pluto.log({"v": 1.0})


# -- process exit (real subprocesses) ---------------------------------------------------

EXIT_SCRIPT = textwrap.dedent("""
    import json, sys
    import pluto
    run = pluto.init(project=sys.argv[1], settings={"flush_interval": 0.05})
    print(json.dumps({"id": run.id}), flush=True)
    for i in range(3):
        run.log({"loss": float(i)})
    if sys.argv[2] == "raise":
        raise RuntimeError("training blew up")
    # "exit": leave without calling finish()
""")


@pytest.mark.parametrize(
    ("ending", "status", "code"), [("exit", "COMPLETED", 0), ("raise", "FAILED", 1)]
)
def test_process_exit_finishes_the_run(
    shared_server: ServerProcess,
    env_for: Callable[..., dict[str, str]],
    project: str,
    tmp_path: Path,
    ending: str,
    status: str,
    code: int,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, project, ending],
        env=env_for(shared_server),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    if ending == "raise":
        assert "training blew up" in proc.stderr  # the traceback is still shown
    run_id = json.loads(proc.stdout.splitlines()[0])["id"]
    info = query.get_run(run_id, url=shared_server.url)
    assert info.status.value == status
    rows = metrics(shared_server, run_id)["loss"]
    assert [(r.step, r.value) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0)]
