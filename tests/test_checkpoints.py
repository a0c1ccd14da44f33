"""Checkpoints and files through the SDK against a real server (SQLite and PostgreSQL).

The lineage scenario is the one from the issue: A saves at 100, 200, 300; B forks A at
250 and saves at 400; forking from B picks A's 200 for step 260, B's 400 for 400, and
nothing for 50 (the error lists 100, 200 and 400).
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from support.server_process import ServerProcess

import pluto
from pluto.wire import API_PREFIX

FAST: dict[str, Any] = {"console": False, "flush_interval": 0.05, "init_timeout": 10,
                        "finish_timeout": 10}


pytestmark = pytest.mark.usefixtures("sdk_env")


@pytest.fixture
def url(shared_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PLUTO_URL", shared_server.url)
    return shared_server.url


@pytest.fixture
def start(url: str, project: str, tmp_path: Path) -> Iterator[Callable[..., pluto.Run]]:
    runs: list[pluto.Run] = []

    def _start(**kwargs: Any) -> pluto.Run:
        kwargs.setdefault("project", project)
        kwargs.setdefault("dir", tmp_path / "pluto")
        run = pluto.init(settings={**FAST, "url": url}, **kwargs)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.finish()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def checkpoint_dir(root: Path, tag: str) -> Path:
    write(root / "model.bin", f"weights {tag}".encode() * 100)
    write(root / "tokenizer" / "vocab.txt", f"vocab {tag}".encode())
    return root


# -- lineage ----------------------------------------------------------------------------


def test_forking_picks_the_newest_checkpoint_at_or_before_the_step_across_the_lineage(
    start: Callable[..., pluto.Run], tmp_path: Path, project: str
) -> None:
    a = start(name="a")
    a.log({"loss": 1.0}, step=0)
    for step in (100, 200, 300):
        a.log({"loss": 1 / step}, step=step)
        assert a.log_checkpoint(checkpoint_dir(tmp_path / f"a{step}", f"a{step}"), step=step)
    a.finish()  # delivered: B can fork at 250
    b = start(name="b", fork_run_id=a.id, fork_step=250)
    assert b.log_checkpoint(checkpoint_dir(tmp_path / "b400", "b400"), step=400)

    into_260 = start(name="c")
    info = pluto.fork_checkpoint(into_260, b, not_after_step=260)
    assert (info.step, info.source_run, info.source_step) == (200, a.id, 200)
    assert info.run == into_260.id and info.source_display_id == a.display_id

    into_400 = start(name="d")
    info = pluto.fork_checkpoint(into_400.display_id, b.display_id, not_after_step=400,
                                 project=project)
    assert (info.step, info.source_run) == (400, b.id)

    newest = start(name="e")
    assert pluto.fork_checkpoint(newest, b).step == 400  # no step: the newest overall

    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(start(name="f"), b, not_after_step=50)
    assert refused.value.status_code == 404
    assert "at or before step 50" in str(refused.value)
    assert "steps with one: 100, 200, 400" in str(refused.value)  # A's 300 is past the fork

    # The fork is recorded and listed; the files are the source's, byte for byte.
    [listed] = into_260.checkpoints
    assert (listed.step, listed.source_run, listed.source_step) == (200, a.id, 200)
    fetched = into_260.download_checkpoint(200, tmp_path / "fetched")
    assert (fetched / "model.bin").read_bytes() == b"weights a200" * 100
    assert (fetched / "tokenizer" / "vocab.txt").read_bytes() == b"vocab a200"


def test_a_forks_own_checkpoint_shadows_the_ancestors_at_the_same_step(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    a = start(name="a")
    a.log({"loss": 1.0}, step=0)
    a.log({"loss": 1.0}, step=20)
    a.log_checkpoint(write(tmp_path / "a.bin", b"a"), step=10)
    a.finish()
    b = start(name="b", fork_run_id=a.id, fork_step=20)
    b.log_checkpoint(write(tmp_path / "b.bin", b"b"), step=10)
    chosen = pluto.find_checkpoint(b, not_after_step=10)
    assert (chosen.run, [f.path for f in chosen.files]) == (b.id, ["b.bin"])
    assert [c.run for c in pluto.list_checkpoints(b, lineage=True)] == [b.id]
    assert pluto.find_checkpoint(a, not_after_step=10).run == a.id


def test_init_forks_the_run_and_its_checkpoint_in_one_call(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    a = start(name="a", config={"lr": 0.1})
    for step in range(10):
        a.log({"loss": 1.0}, step=step)
    a.log_checkpoint(checkpoint_dir(tmp_path / "c5", "five"), step=5)
    a.log_checkpoint(checkpoint_dir(tmp_path / "c9", "nine"), step=9)
    a.finish()
    b = start(name="b", fork_run_id=a.id, fork_step=7, fork_checkpoint=True)
    assert b.fork_run_id == a.id and b.config == {"lr": 0.1}
    assert b.checkpoint_path is not None
    assert (b.checkpoint_path / "model.bin").read_bytes() == b"weights five" * 100
    [copied] = b.checkpoints
    assert (copied.step, copied.source_run) == (5, a.id)


def test_init_with_fork_checkpoint_and_no_checkpoint_creates_no_run(
    start: Callable[..., pluto.Run], url: str, project: str
) -> None:
    a = start(name="a")
    a.log({"loss": 1.0}, step=0)
    a.log({"loss": 1.0}, step=5)
    a.finish()
    with pytest.raises(pluto.RequestRejected, match="no checkpoint yet"):
        start(name="b", fork_run_id=a.id, fork_step=3, fork_checkpoint=True)
    runs = httpx.get(f"{url}{API_PREFIX}/projects/{project}/runs").json()["runs"]
    assert [r["name"] for r in runs] == ["a"]


# -- torch --------------------------------------------------------------------------------


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


def test_a_model_and_optimizer_are_saved_forked_and_loaded_bit_for_bit(
    start: Callable[..., pluto.Run]
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    a = start(name="a")
    for step, loss in enumerate(train(model, optim, 20)):
        a.log({"loss": loss}, step=step)
    assert a.save_checkpoint({"model": model, "optim": optim, "epoch": 3}, step=19)
    reference = copy.deepcopy(model)
    reference_optim = torch.optim.Adam(reference.parameters(), lr=1e-2)
    reference_optim.load_state_dict(copy.deepcopy(optim.state_dict()))
    expected_next = train(reference, reference_optim, 5)
    a.finish()

    b = start(name="b", fork_run_id=a.id, fork_step=19, fork_checkpoint=True)
    state = pluto.load_checkpoint(b, not_after_step=19)
    assert state["epoch"] == 3
    restored = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    restored.load_state_dict(state["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    restored_optim = torch.optim.Adam(restored.parameters(), lr=1e-2)
    restored_optim.load_state_dict(state["optim"])
    # Training continues from the forked step exactly as the original would have.
    continued = train(restored, restored_optim, 5)
    assert continued == expected_next
    for offset, loss in enumerate(continued):
        b.log({"loss": loss}, step=20 + offset)
    assert b.step == 24


# -- files, errors ---------------------------------------------------------------------------


def test_files_are_kept_with_their_run_and_not_inherited_by_forks(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    a = start(name="a")
    plot = write(tmp_path / "plot.png", os.urandom(5000))
    info = a.log_file(plot, step=3)
    assert info is not None and info.name == "plot.png" and info.size == 5000
    assert info.sha256 == hashlib.sha256(plot.read_bytes()).hexdigest()
    assert [f.name for f in a.files] == ["plot.png"]
    a.log({"loss": 1.0}, step=0)
    a.log({"loss": 1.0}, step=3)
    a.finish()
    b = start(name="b", fork_run_id=a.id, fork_step=3)
    assert b.files == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert a.log_file(write(tmp_path / "other" / "plot.png", b"different")) is None
    assert "pass another name=" in str(caught[0].message)


def test_a_failed_checkpoint_warns_and_training_carries_on(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    run = start(name="a")
    with pytest.warns(RuntimeWarning, match="neither a file nor a directory"):
        assert run.log_checkpoint(tmp_path / "missing", step=1) is None
    run.log({"loss": 1.0})


def test_checkpoints_at_one_step_are_immutable_and_a_retry_is_harmless(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    run = start(name="a")
    path = write(tmp_path / "ckpt.bin", b"x" * 1000)
    first = run.log_checkpoint(path, step=5, metadata={"acc": 0.9})
    again = run.log_checkpoint(path, step=5, metadata={"acc": 0.9})
    assert first is not None and again is not None and first.created_at == again.created_at
    with pytest.warns(RuntimeWarning, match="already has a checkpoint at step 5"):
        assert run.log_checkpoint(write(tmp_path / "ckpt.bin", b"y" * 1000), step=5) is None
    assert [(c.step, c.metadata) for c in run.checkpoints] == [(5, {"acc": 0.9})]


def test_unknown_runs_and_projects_are_named_in_the_error(
    start: Callable[..., pluto.Run], project: str
) -> None:
    run = start(name="a")
    with pytest.raises(pluto.RequestRejected, match="no-such-run") as refused:
        pluto.fork_checkpoint(run, "no-such-run", project=project)
    assert refused.value.status_code == 404
    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(run, run.display_id, from_project="no-such-project",
                              project=project)
    assert refused.value.status_code == 400 and "no-such-project" in str(refused.value)
    assert "use that project" in str(refused.value)


def test_ranks_saving_the_same_checkpoint_at_once_make_one(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    run = start(name="ranks")
    path = write(tmp_path / "same.bin", os.urandom(200_000))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: run.log_checkpoint(path, step=3), range(8)))
    assert all(result is not None for result in results)
    assert len({result.created_at for result in results if result}) == 1
    assert [c.step for c in run.checkpoints] == [3]


LOAD_SCRIPT = """
import hashlib, sys
import pluto
path = pluto.download_checkpoint(sys.argv[1], project=sys.argv[2], quiet=True)
print(hashlib.sha256((path / "big.bin").read_bytes()).hexdigest())
"""


def test_ranks_loading_one_checkpoint_at_once_all_get_it(
    start: Callable[..., pluto.Run], url: str, project: str, tmp_path: Path
) -> None:
    """Every rank of a node downloads into the same cache dir: one fetches, the others find
    the files there (before: they shared one ``.partial`` file, and the renames of the
    first made the others fail)."""
    blob = os.urandom(24 * 1024 * 1024)
    run = start(name="loaded")
    assert run.log_checkpoint(write(tmp_path / "ckpt" / "big.bin", blob), step=1) is not None
    work = tmp_path / "node"
    work.mkdir()
    ranks = [subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, run.display_id, project],
                              cwd=work, env={**os.environ, "PLUTO_URL": url}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    answers = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0] * 4, [err[-2000:] for _, err in answers]
    assert {out.strip() for out, _ in answers} == {hashlib.sha256(blob).hexdigest()}
    cached = [p for p in (work / ".pluto").rglob("*") if p.is_file()]
    assert [p.name for p in cached if not p.name.endswith(".lock")] == ["big.bin"], cached


def test_a_checkpoint_is_chosen_by_step_or_not_after_step_never_both(
    start: Callable[..., pluto.Run], url: str, tmp_path: Path
) -> None:
    run = start(name="both")
    for step in (1, 5):
        assert run.log_checkpoint(write(tmp_path / f"c{step}.bin", b"%d" % step), step) is not None
    both = httpx.get(f"{url}{API_PREFIX}/runs/{run.id}/checkpoints/resolve",
                     params={"step": 5, "not_after_step": 1})
    assert both.status_code == 422 and "pass one of them" in both.json()["detail"], both.text
    # The same files again at a step the run holds: the conflict says they are the same.
    again = httpx.post(f"{url}{API_PREFIX}/runs/{run.id}/checkpoints/fork",
                       json={"from_run": str(run.id), "not_after_step": 5})
    assert again.status_code == 409, again.text
    assert "the same files, logged by the run itself" in again.json()["detail"]


def test_downloading_into_a_file_says_to_choose_another_destination(
    start: Callable[..., pluto.Run], tmp_path: Path
) -> None:
    run = start(name="dest")
    assert run.log_checkpoint(write(tmp_path / "ckpt" / "a.bin", b"a"), step=1) is not None
    occupied = write(tmp_path / "occupied", b"not a directory")
    with pytest.raises(pluto.PlutoError, match="it exists and is not a directory"):
        pluto.download_checkpoint(run.id, dest=occupied, quiet=True)


@pytest.mark.parametrize(("body", "phrase"), [
    ({"from_run": "m", "from_s3_bucket": "\U00023dbd bad"}, "is not a bucket name"),
    ({"from_run": "", "from_s3_bucket": "art"}, "is not a name ART uses"),
    ({"from_run": "a/../b", "from_s3_bucket": "art"}, "is not a name ART uses"),
    ({"from_run": "m", "from_project": "..", "from_s3_bucket": "art"}, "is not a name ART uses"),
])
def test_an_art_fork_with_names_no_bucket_can_hold_is_refused_before_any_s3_call(
    start: Callable[..., pluto.Run], url: str, project: str, body: dict[str, Any], phrase: str
) -> None:
    run = start(name="target")
    answer = httpx.post(f"{url}{API_PREFIX}/runs/{run.id}/checkpoints/fork", json=body)
    assert answer.status_code == 422, answer.text
    assert phrase in answer.json()["detail"]
