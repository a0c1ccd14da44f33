"""Runs over HTTP: create-or-attach, display ids, resume, fork, status, config and tags.

Every test talks to a real ``pluto server`` process over loopback, once on
SQLite and once on PostgreSQL. Tests share one server per backend and keep to
projects of their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from api_helpers import (
    Api,
    Json,
    all_at_once,
    assert_error,
    ramp,
    seed_lineage,
    unique_project,
)
from support.server_process import ServerProcess


@pytest.fixture(scope="module")
def api(shared_server: ServerProcess) -> Iterator[Api]:
    with Api(shared_server.url) as client:
        yield client


def history(run: Json) -> list[str]:
    return [change["status"] for change in run["status_history"]]


# -- create or attach ------------------------------------------------------------------


def test_32_concurrent_creators_of_one_run_id_get_one_run(api: Api) -> None:
    project = unique_project("race")

    def create(i: int) -> tuple[int, Json]:
        resp = api.create(project, run_id="job-7", name=f"rank-{i}")
        return resp.status_code, resp.json()

    answers = all_at_once(32, create)

    statuses = Counter(status for status, _ in answers)
    assert statuses == {201: 1, 200: 31}
    creators = [body for status, body in answers if status == 201]
    assert [body["resumed"] for body in creators] == [False]
    assert all(body["resumed"] for status, body in answers if status == 200)
    assert len({body["id"] for _, body in answers}) == 1
    assert len({body["display_id"] for _, body in answers}) == 1

    run = api.get_ok("job-7", project)
    assert run["name"] == creators[0]["name"]  # the creator's name, nobody else's
    assert history(run) == ["RUNNING"]
    listed = api.request("GET", f"/projects/{project}/runs").json()["runs"]
    assert [r["id"] for r in listed] == [run["id"]]


def test_concurrent_creation_of_distinct_runs_numbers_them_without_gaps(api: Api) -> None:
    project = unique_project("count")
    created = all_at_once(16, lambda i: api.create_ok(project, run_id=f"r{i}"))
    numbers = sorted(int(run["display_id"].rsplit("-", 1)[1]) for run in created)
    assert numbers == list(range(1, 17))
    assert not any(run["resumed"] for run in created)


def test_projects_are_created_on_first_use_with_a_prefix_and_numbered_display_ids(
    api: Api,
) -> None:
    project = unique_project("my-model-project")  # my-model-project-<hex>: MMP
    other = f"mnist{project[-12:]}"  # one word: its first three letters, MNI
    assert_error(api.request("GET", f"/projects/{project}/runs"), 404, "does not exist")

    runs = [api.create_ok(project, run_id=f"run-{i}") for i in range(3)]
    foreign = api.create_ok(other)
    also_mine = api.create_ok(project)  # no external id: always a new run

    assert [r["display_id"] for r in runs] == ["MMP-1", "MMP-2", "MMP-3"]
    assert foreign["display_id"] == "MNI-1"  # numbering is per project
    assert also_mine["display_id"] == "MMP-4"
    assert also_mine["name"] == "run-4"
    assert all(r["project"] == project and r["status"] == "RUNNING" for r in runs)
    assert runs[0]["url"].endswith(f"/projects/{project}/runs/MMP-1")

    projects = {p["name"]: p for p in api.request("GET", "/projects").json()["projects"]}
    assert projects[project]["prefix"] == "MMP" and projects[project]["runs"] == 4
    assert projects[other]["prefix"] == "MNI" and projects[other]["runs"] == 1
    listed = api.request("GET", f"/projects/{project}/runs").json()["runs"]
    assert [r["display_id"] for r in listed] == ["MMP-4", "MMP-3", "MMP-2", "MMP-1"]


def test_camel_case_project_names_use_word_initials(api: Api) -> None:
    project = f"BigNet{unique_project('')[1:]}"  # words Big, Net<hex>: BN
    assert api.create_ok(project)["display_id"] == "BN-1"


def test_an_attaching_caller_cannot_rename_the_run(api: Api) -> None:
    project = unique_project()
    first = api.create(project, run_id="shared", name="chosen-by-rank-0")
    assert first.status_code == 201
    second = api.create(project, run_id="shared", name="chosen-by-rank-1")
    assert second.status_code == 200
    assert second.json()["resumed"] is True
    assert second.json()["name"] == "chosen-by-rank-0"
    assert api.get_ok("shared", project)["name"] == "chosen-by-rank-0"


def test_the_same_run_id_in_two_projects_is_two_runs(api: Api) -> None:
    one, two = unique_project(), unique_project()
    a = api.create_ok(one, run_id="job")
    b = api.create_ok(two, run_id="job")
    assert a["id"] != b["id"] and not a["resumed"] and not b["resumed"]
    assert api.get_ok("job", one)["id"] == a["id"]
    assert api.get_ok("job", two)["id"] == b["id"]
    assert_error(api.get("job"), 409, "several projects", "name the project")


def test_a_run_is_found_by_numeric_display_or_external_id(api: Api) -> None:
    project = unique_project()
    run = api.create_ok(project, run_id="ext-1")
    for ref in (str(run["id"]), run["display_id"], "ext-1"):
        assert api.get_ok(ref, project)["id"] == run["id"]
    assert api.get_ok(run["id"])["id"] == run["id"]  # numeric ids need no project
    assert_error(api.get("nope-123", project), 404, "does not exist")
    assert_error(api.get(999_999_999), 404, "does not exist")
    other = unique_project()
    api.create_ok(other)
    assert_error(api.get(run["id"], other), 400, f"belongs to project {project!r}")


def test_a_numeric_looking_external_id_is_found_when_no_run_has_that_id(api: Api) -> None:
    project = unique_project()
    run = api.create_ok(project, run_id="987654321")
    api.log(run["id"], {"loss": ramp(0, 5)})
    assert api.get_ok("987654321", project)["id"] == run["id"]
    fork = api.create_ok(project, fork_run_id="987654321", fork_step=3)
    assert fork["forked_from"] == run["id"]


# -- resume ------------------------------------------------------------------------------


def test_resume_by_numeric_id_display_id_and_external_id(api: Api) -> None:
    project = unique_project("my-model-project")
    api.create_ok(project, run_id="first")
    run = api.create_ok(project, run_id="second", name="keep-me")
    assert run["display_id"] == "MMP-2"

    for ref in (str(run["id"]), "MMP-2", "second"):
        resp = api.create(project, run_id=ref, resume=True, name="ignored")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["resumed"] is True
        assert body["id"] == run["id"] and body["name"] == "keep-me"
    # Resuming by numeric or display id made no new run with that external id.
    assert [
        r["display_id"] for r in api.request("GET", f"/projects/{project}/runs").json()["runs"]
    ] == ["MMP-2", "MMP-1"]


def test_resume_of_a_missing_run_is_404_and_says_to_drop_resume(api: Api) -> None:
    project = unique_project("my-model-project")
    api.create_ok(project)
    for ref in ("never-created", "MMP-99", "999999999"):
        assert_error(
            api.create(project, run_id=ref, resume=True),
            404,
            repr(ref),
            "does not exist",
            "drop resume=True",
        )
    assert_error(api.create(project, resume=True), 422, "resume=True needs run_id")
    runs = api.request("GET", f"/projects/{project}/runs").json()["runs"]
    assert len(runs) == 1  # nothing was created by the refused resumes


def test_resume_by_numeric_id_of_a_run_in_another_project_is_refused(api: Api) -> None:
    mine, theirs = unique_project(), unique_project()
    foreign = api.create_ok(theirs)
    api.create_ok(mine)
    assert_error(
        api.create(mine, run_id=str(foreign["id"]), resume=True),
        400,
        f"belongs to project {theirs!r}",
    )


# -- fork --------------------------------------------------------------------------------


def test_fork_records_the_ancestor_that_owns_the_fork_step(api: Api) -> None:
    """The seed example: forking C at 75 gives B, at 30 gives A."""
    project = unique_project()
    a, b, c = seed_lineage(api, project)
    assert (api.get_ok(a["id"])["first_step"], api.get_ok(a["id"])["last_step"]) == (0, 100)
    assert (api.get_ok(b["id"])["first_step"], api.get_ok(b["id"])["last_step"]) == (51, 200)
    assert (b["forked_from"], b["fork_step"]) == (a["id"], 50)
    assert (c["forked_from"], c["fork_step"]) == (b["id"], 150)
    assert c["forked_from_display_id"] == b["display_id"]

    at_75 = api.create_ok(project, fork_run_id=str(c["id"]), fork_step=75)
    assert (at_75["forked_from"], at_75["fork_step"]) == (b["id"], 75)
    assert at_75["forked_from_display_id"] == b["display_id"]
    at_30 = api.create_ok(project, fork_run_id=c["display_id"], fork_step=30)
    assert (at_30["forked_from"], at_30["fork_step"]) == (a["id"], 30)
    assert at_30["forked_from_display_id"] == a["display_id"]

    # The boundaries: a fork owns the steps after its fork step; the fork step itself
    # belongs upstream.
    expected = [(c, 150, b), (c, 51, b), (c, 50, a), (c, 0, a), (b, 200, b), (b, 50, a)]
    for run, step, owner in expected:
        fork = api.create_ok(project, fork_run_id=str(run["id"]), fork_step=step)
        assert fork["forked_from"] == owner["id"], (run["name"], step)
        assert fork["fork_step"] == step


def test_system_metrics_do_not_move_the_runs_step_range(api: Api) -> None:
    """The sidecar logs ``sys/`` keys with the Unix time as the step: the run's step range
    (where it resumes, where it may be forked) stays its training steps."""
    project = unique_project()
    run = api.create_ok(project, run_id="trained")
    api.log(run["id"], {"loss": ramp(0, 100)})
    now = 1_796_624_587
    api.log(run["id"], {"sys/cpu_percent": [(now, 12.5)], "sys/mem_percent": [(now, 40.0)]},
            writer=3)
    api.log(run["id"], {"sys/cpu_percent": [(now + 5, 13.0)]})  # a chunk of sys/ keys only
    stored = api.get_ok(run["id"])
    assert (stored["first_step"], stored["last_step"]) == (0, 100)
    assert_error(api.create(project, fork_run_id="trained", fork_step=1_000_000), 422, "0-100")
    resumed = api.create_ok(project, run_id="trained", resume=True)
    assert resumed["last_step"] == 100
    # The system metrics are stored all the same.
    series = api.series(run["id"], "sys/cpu_percent")
    assert sorted(step for one in series for step in one.steps) == [now, now + 5]


def test_fork_inherits_config_deep_merged_and_tags_from_the_resolved_parent(api: Api) -> None:
    project = unique_project()
    a, b, c = seed_lineage(
        api,
        project,
        configs=[
            {"opt": {"lr": 0.1, "momentum": 0.9}, "model": "resnet", "layers": [1, 2]},
            {"opt": {"lr": 0.05}, "stage": "b"},
            None,
        ],
        tags=[["base", "a"], ["b"], None],
    )
    assert b["config"] == {
        "opt": {"lr": 0.05, "momentum": 0.9},
        "model": "resnet",
        "layers": [1, 2],
        "stage": "b",
    }
    assert b["tags"] == ["b"]  # inherit_tags defaults to false

    fork_b = api.create_ok(
        project,
        fork_run_id=str(c["id"]),
        fork_step=120,
        config={"opt": {"wd": 0.01}, "layers": [3], "model": None},
        tags=["new", "b", "new"],
        inherit_tags=True,
    )
    assert fork_b["forked_from"] == b["id"]
    # Nested mappings merge key by key; lists and explicit nulls replace; the child wins.
    assert fork_b["config"] == {
        "opt": {"lr": 0.05, "momentum": 0.9, "wd": 0.01},
        "model": None,
        "layers": [3],
        "stage": "b",
    }
    assert fork_b["tags"] == ["b", "new"]

    fork_a = api.create_ok(
        project,
        fork_run_id=str(c["id"]),
        fork_step=30,
        config={"seed": 1},
        tags=["a", "x"],
        inherit_tags=True,
    )
    assert fork_a["forked_from"] == a["id"]
    # From A, not from B or C: no "stage".
    assert fork_a["config"] == {
        "opt": {"lr": 0.1, "momentum": 0.9},
        "model": "resnet",
        "layers": [1, 2],
        "seed": 1,
    }
    assert fork_a["tags"] == ["base", "a", "x"]

    plain = api.create_ok(
        project,
        fork_run_id=str(a["id"]),
        fork_step=10,
        tags=["x", "x"],
        config={"seed": 2},
        inherit_config=False,
    )
    assert plain["config"] == {"seed": 2}
    assert plain["tags"] == ["x"]
    bare = api.create_ok(project, fork_run_id=str(a["id"]), fork_step=10, inherit_config=False)
    assert bare["config"] == {} and bare["tags"] == []


def test_a_fork_is_named_after_its_resolved_parent_unless_named(api: Api) -> None:
    project = unique_project()
    a, b, c = seed_lineage(api, project)
    assert api.create_ok(project, fork_run_id=str(c["id"]), fork_step=30)["name"] == a["name"]
    assert api.create_ok(project, fork_run_id=str(c["id"]), fork_step=90)["name"] == b["name"]
    named = api.create_ok(project, fork_run_id=str(c["id"]), fork_step=90, name="sweep-3")
    assert named["name"] == "sweep-3"


def test_ranks_forking_with_one_run_id_get_one_fork(api: Api) -> None:
    project = unique_project()
    a, _, _ = seed_lineage(api, project)
    answers = all_at_once(
        8, lambda i: api.create(project, run_id="fork-job", fork_run_id=str(a["id"]), fork_step=40)
    )
    assert Counter(r.status_code for r in answers) == {201: 1, 200: 7}
    bodies = [r.json() for r in answers]
    assert len({b["id"] for b in bodies}) == 1
    assert {(b["forked_from"], b["fork_step"]) for b in bodies} == {(a["id"], 40)}


def test_attaching_with_fork_arguments_to_a_run_that_is_not_that_fork_is_409(api: Api) -> None:
    """The caller's data is meant for a fork: landing it in a run that is something else
    (not a fork, or a fork of another step or run) without a word would mix two runs."""
    project = unique_project()
    a, b, _ = seed_lineage(api, project)
    plain = api.create_ok(project, run_id="plain")
    assert_error(api.create(project, run_id="plain", fork_run_id=str(a["id"]), fork_step=40),
                 409, f"({plain['display_id']}) exists already and is not a fork",
                 "run_id of its own", "drop fork_run_id and fork_step")
    fork = api.create_ok(project, run_id="fork", fork_run_id=str(a["id"]), fork_step=40)
    for other_parent, step in [(str(a["id"]), 41), (str(b["id"]), 120)]:
        assert_error(api.create(project, run_id="fork", fork_run_id=other_parent,
                                fork_step=step), 409,
                     f"is a fork of {a['display_id']} at step 40")
    # The same fork, its parent named any way (numeric, display or a descendant that
    # inherits the step), attaches; so does a plain attach.
    for parent in [str(a["id"]), a["display_id"], str(b["id"])]:
        again = api.create(project, run_id="fork", fork_run_id=parent, fork_step=40)
        assert again.status_code == 200 and again.json()["id"] == fork["id"], again.text
    assert api.create(project, run_id="fork").json()["id"] == fork["id"]
    assert api.create(project, run_id="plain").json()["id"] == plain["id"]


@pytest.fixture(scope="module")
def seeded(api: Api) -> tuple[str, Json, Json, Json]:
    """One seed lineage (A, B, C) for the refused forks to aim at."""
    project = unique_project("forks")
    a, b, c = seed_lineage(api, project)
    return project, a, b, c


class TestBadForks:
    """Each refused fork says what to change, and creates nothing."""

    def runs_in(self, api: Api, project: str) -> int:
        return len(api.request("GET", f"/projects/{project}/runs").json()["runs"])

    @pytest.mark.parametrize("step", [101, 10_000])
    def test_after_the_last_logged_step(
        self, api: Api, seeded: tuple[str, Json, Json, Json], step: int
    ) -> None:
        project, a, _, _ = seeded
        before = self.runs_in(api, project)
        assert_error(
            api.create(project, fork_run_id=str(a["id"]), fork_step=step),
            422,
            f"fork_step {step} is outside",
            "(0-100)",
            "choose a step in that range",
        )
        assert self.runs_in(api, project) == before

    def test_after_the_fork_step_of_a_run_that_logged_nothing_of_its_own(
        self, api: Api, seeded: tuple[str, Json, Json, Json]
    ) -> None:
        project, _, _, c = seeded
        assert_error(
            api.create(project, fork_run_id=c["display_id"], fork_step=151),
            422,
            "outside",
            "(0-150)",
            "choose a step in that range",
        )

    def test_before_the_first_logged_step(self, api: Api) -> None:
        project = unique_project()
        late = api.create_ok(project)
        api.log(late["id"], {"loss": ramp(10, 20)})
        assert_error(
            api.create(project, fork_run_id=str(late["id"]), fork_step=5),
            422,
            "fork_step 5 is outside",
            "(10-20)",
            "choose a step in that range",
        )
        assert api.create(project, fork_run_id=str(late["id"]), fork_step=10).status_code == 201

    def test_of_a_run_that_logged_nothing(self, api: Api) -> None:
        project = unique_project()
        empty = api.create_ok(project)
        assert_error(
            api.create(project, fork_run_id=str(empty["id"]), fork_step=0),
            422,
            "logged no steps",
            "log at least one step before forking",
        )

    def test_of_a_parent_in_another_project(
        self, api: Api, seeded: tuple[str, Json, Json, Json]
    ) -> None:
        project, a, _, _ = seeded
        elsewhere = unique_project("elsewhere")
        assert_error(
            api.create(elsewhere, fork_run_id=str(a["id"]), fork_step=10),
            400,
            f"belongs to project {project!r}",
        )
        assert_error(
            api.create(elsewhere, fork_run_id=a["display_id"], fork_step=10),
            400,
            f"not in project {elsewhere!r}",
            "exists in",
            project,
        )
        # The refused request did not even create the project it named.
        assert_error(api.request("GET", f"/projects/{elsewhere}/runs"), 404, "does not exist")

    @pytest.mark.parametrize("ref", ["999999999", "ZZZZ-404", "no-such-run"])
    def test_of_an_unknown_parent(
        self, api: Api, seeded: tuple[str, Json, Json, Json], ref: str
    ) -> None:
        project, *_ = seeded
        assert_error(api.create(project, fork_run_id=ref, fork_step=10), 404, "does not exist")

    @pytest.mark.parametrize(
        ("fields", "missing"),
        [
            ({"fork_run_id": "1"}, "fork_step is missing"),
            ({"fork_step": 10}, "fork_run_id is missing"),
        ],
    )
    def test_with_only_half_of_the_fork_arguments(
        self, api: Api, seeded: tuple[str, Json, Json, Json], fields: Json, missing: str
    ) -> None:
        project, *_ = seeded
        before = self.runs_in(api, project)
        assert_error(
            api.create(project, **fields),
            422,
            "go together",
            missing,
            "pass both to fork, or neither",
        )
        assert self.runs_in(api, project) == before

    def test_with_a_negative_step(self, api: Api, seeded: tuple[str, Json, Json, Json]) -> None:
        project, a, _, _ = seeded
        assert_error(
            api.create(project, fork_run_id=str(a["id"]), fork_step=-1),
            422,
            "fork_step must be >= 0",
            "-1",
        )

    def test_together_with_resume(self, api: Api, seeded: tuple[str, Json, Json, Json]) -> None:
        project, a, _, _ = seeded
        assert_error(
            api.create(project, run_id="x", resume=True, fork_run_id=str(a["id"]), fork_step=10),
            422,
            "cannot fork",
            "drop one",
        )


# -- status --------------------------------------------------------------------------------


def test_16_concurrent_completions_write_one_transition(api: Api) -> None:
    run = api.create_ok(unique_project(), run_id="done")
    answers = all_at_once(16, lambda _: api.finish(run["id"], "COMPLETED"))
    assert {r.status_code for r in answers} == {200}
    final = api.get_ok(run["id"])
    assert final["status"] == "COMPLETED"
    assert history(final) == ["RUNNING", "COMPLETED"]
    assert final["finished_at"] is not None


@pytest.mark.parametrize("severe", ["FAILED", "TERMINATED"])
def test_the_most_severe_of_concurrent_finishes_wins(api: Api, severe: str) -> None:
    run = api.create_ok(unique_project())
    wanted = [severe if i == 11 else "COMPLETED" for i in range(16)]
    answers = all_at_once(16, lambda i: api.finish(run["id"], wanted[i]))
    assert {r.status_code for r in answers} == {200}
    final = api.get_ok(run["id"])
    assert final["status"] == severe
    changes = history(final)
    assert changes[0] == "RUNNING" and changes[-1] == severe
    assert changes.count(severe) == 1 and changes.count("COMPLETED") <= 1


def test_finishing_never_lowers_the_severity(api: Api) -> None:
    run = api.create_ok(unique_project())
    assert api.finish(run["id"], "TERMINATED").json()["status"] == "TERMINATED"
    assert api.finish(run["id"], "COMPLETED").json()["status"] == "TERMINATED"
    assert api.finish(run["id"], "FAILED").json()["status"] == "FAILED"
    assert api.finish(run["id"], "TERMINATED").json()["status"] == "FAILED"
    assert history(api.get_ok(run["id"])) == ["RUNNING", "TERMINATED", "FAILED"]


def test_finishing_with_running_or_an_unknown_status_is_422(api: Api) -> None:
    run = api.create_ok(unique_project())
    assert_error(
        api.finish(run["id"], "RUNNING"), 422, "COMPLETED, FAILED or TERMINATED", "not RUNNING"
    )
    assert_error(api.finish(run["id"], "DONE"), 422, "invalid RunFinish", "$.status")
    assert_error(api.finish(999_999_999), 404, "does not exist")
    assert api.get_ok(run["id"])["status"] == "RUNNING"


def test_attaching_to_a_finished_run_reopens_it(api: Api) -> None:
    project = unique_project()
    run = api.create_ok(project, run_id="restartable")
    api.finish(run["id"], "FAILED")
    again = api.create(project, run_id="restartable")
    assert again.status_code == 200
    body = again.json()
    assert body["resumed"] is True and body["id"] == run["id"]
    assert body["status"] == "RUNNING" and body["finished_at"] is None
    assert history(body) == ["RUNNING", "FAILED", "RUNNING"]
    # Attaching to a running run writes no transition.
    api.create(project, run_id="restartable")
    assert history(api.get_ok(run["id"])) == ["RUNNING", "FAILED", "RUNNING"]
    # The reopened run finishes afresh, even at a lower severity than before.
    assert api.finish(run["id"], "COMPLETED").json()["status"] == "COMPLETED"
    assert history(api.get_ok(run["id"])) == ["RUNNING", "FAILED", "RUNNING", "COMPLETED"]


def test_16_ranks_reattaching_to_a_finished_run_reopen_it_once(api: Api) -> None:
    project = unique_project()
    run = api.create_ok(project, run_id="job")
    api.finish(run["id"], "TERMINATED")
    answers = all_at_once(16, lambda _: api.create(project, run_id="job"))
    assert {r.status_code for r in answers} == {200}
    assert all(r.json()["status"] == "RUNNING" and r.json()["resumed"] for r in answers)
    assert history(api.get_ok(run["id"])) == ["RUNNING", "TERMINATED", "RUNNING"]


# -- config and tag updates ---------------------------------------------------------------------


def test_patch_deep_merges_config_and_adds_then_removes_tags(api: Api) -> None:
    project = unique_project()
    run = api.create_ok(
        project,
        run_id="tuned",
        config={"opt": {"lr": 0.1, "betas": [0.9, 0.99]}, "epochs": 3},
        tags=["a", "b"],
    )
    resp = api.patch(
        "tuned",
        {
            "config": {"opt": {"lr": 0.2}, "epochs": [1], "new": True},
            "add_tags": ["c", "a", "d"],
            "remove_tags": ["b", "d"],
        },
        project,
    )
    assert resp.status_code == 200, resp.text
    updated = resp.json()
    assert updated["config"] == {
        "opt": {"lr": 0.2, "betas": [0.9, 0.99]},
        "epochs": [1],
        "new": True,
    }
    assert updated["tags"] == ["a", "c"]
    assert updated["updated_at"] >= run["updated_at"]
    assert api.get_ok(run["id"])["config"] == updated["config"]

    # By display id, and an empty update changes nothing.
    same = api.patch(run["display_id"], {}, project).json()
    assert (same["config"], same["tags"]) == (updated["config"], updated["tags"])


def test_concurrent_patches_from_8_ranks_lose_no_key_or_tag(api: Api) -> None:
    run = api.create_ok(unique_project(), config={"base": 1})
    answers = all_at_once(
        8,
        lambda i: api.patch(
            run["id"], {"config": {f"rank{i}": i, "shared": {f"r{i}": True}}, "add_tags": [f"t{i}"]}
        ),
    )
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    final = api.get_ok(run["id"])
    assert final["config"] == {
        "base": 1,
        **{f"rank{i}": i for i in range(8)},
        "shared": {f"r{i}": True for i in range(8)},
    }
    assert sorted(final["tags"]) == sorted(f"t{i}" for i in range(8))


def test_bad_patches_say_what_to_change(api: Api) -> None:
    run = api.create_ok(unique_project())
    assert_error(api.patch(run["id"], {"add_tag": ["x"]}), 422, "unknown field", "add_tag")
    assert_error(api.patch(run["id"], {"config": "lr=0.1"}), 422, "Expected `object | null`")
    assert_error(api.patch(run["id"], {"add_tags": [""]}), 422, "tag", "1-128 characters")
    assert_error(api.patch(999_999_999, {"config": {"a": 1}}), 404, "does not exist")
    assert api.get_ok(run["id"])["tags"] == []


def test_text_that_a_database_cannot_store_is_refused_before_it_reaches_it(api: Api) -> None:
    # PostgreSQL stores no NUL character in text: a name or fork reference holding one used to
    # fail the insert or the lookup (a 500 that a sender retries); a trailing newline slipped
    # through the "$" of the name patterns.
    project = unique_project("nul")
    parent = api.create_ok(project, run_id="parent")
    assert_error(api.create(project, name="a\x00b"), 422, "name", "NUL")
    assert_error(api.create(project, fork_run_id="par\x00ent", fork_step=0), 422,
                 "fork_run_id", "NUL")
    assert_error(api.create(project, run_id="parent\n"), 422, "run_id")
    assert_error(api.create(project + "\n"), 422, "project name")
    # Found by Schemathesis: a checkpoint fork's source run is looked up by name.
    fork = f"/runs/{parent['id']}/checkpoints/fork"
    assert_error(api.request("POST", fork, json={"from_run": "par\x00ent"}), 422,
                 "from_run", "NUL")
    assert_error(api.request("POST", fork, json={"from_run": "parent", "from_project": "p\x00"}),
                 422, "from_project", "NUL")
    # Inside config's and tags' JSON a NUL is escaped: stored and given back as it was.
    updated = api.patch(parent["id"], {"config": {"k\x00": "v\x00"}, "add_tags": ["a\x00"]})
    assert updated.status_code == 200, updated.text
    stored = api.get(parent["id"]).json()
    assert stored["config"]["k\x00"] == "v\x00" and stored["tags"] == ["a\x00"]


def test_a_display_id_and_an_external_id_spelled_the_same_are_told_apart(
        server_factory: Callable[..., ServerProcess]) -> None:
    # A server of its own: in the shared one other projects may have the same prefix.
    with Api(server_factory().url) as api:
        project = unique_project()
        first = api.create_ok(project, run_id="first")
        prefix = first["display_id"].split("-")[0]
        lookalike = api.create_ok(project, run_id=f"{prefix}-1")  # == first's display id
        assert api.get_ok(f"{prefix}-1", project=project)["id"] == first["id"]  # display wins
        assert api.get_ok(lookalike["id"])["run_id"] == f"{prefix}-1"
        ids = sorted([first["id"], lookalike["id"]])
        assert_error(api.get(f"{prefix}-1"), 409, f"names 2 runs of project {project!r}",
                     f"use the numeric id ({ids[0]}, {ids[1]})")


def test_a_display_id_with_a_number_no_run_can_have_is_not_found(api: Api) -> None:
    # Found by Schemathesis: the number reached the database and overflowed there (a 500).
    project = unique_project("big")
    api.create_ok(project, run_id="only")
    for ref in ("B-2147483648", "B-99999999999999999999"):
        assert_error(api.get(ref, project=project), 404, ref)
        assert_error(api.create(project, run_id=ref, resume=True), 404, ref)
        assert_error(api.create(project, fork_run_id=ref, fork_step=0), 404, ref)
