"""Edges of the API that once answered 500 or lost something without a word.

Bodies nested too deeply, values JSON has no form for (MessagePack extension values, NaN and
±Infinity in a run's config), a console line on a stream that does not exist, a fork whose
inherited tags pass the limit, a run list longer than one page, a search for non-ASCII text,
and the URL of run links. Every API test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import pytest
import sqlalchemy as sa
from api_helpers import Api, Json, assert_error, chunk, ramp, unique_project
from support.server_process import ServerProcess

from pluto import query
from pluto.cli import main as cli_main
from pluto.wire import JSON, MAX_TAGS, MSGPACK, encode_msgpack
from pluto_server.database import Database, sqlite_url
from pluto_server.runs import MAX_RUN_PAGE
from pluto_server.schema import runs
from pluto_server.settings import ServerSettings


@pytest.fixture(scope="module")
def api(shared_server: ServerProcess) -> Iterator[Api]:
    with Api(shared_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def database(shared_server: ServerProcess) -> Iterator[Database]:
    """The shared server's own database, for a state the API no longer lets anyone make."""
    db = Database(shared_server.database_url or sqlite_url(shared_server.data_dir))
    yield db
    db.dispose()


def send(api: Api, method: str, path: str, body: Any, *, msgpack: bool = True
         ) -> httpx.Response:
    """``body`` as MessagePack (or JSON text, when it is a ``str``), answered as JSON."""
    if isinstance(body, str):
        content, content_type = body.encode(), JSON
    else:
        content, content_type = encode_msgpack(body), MSGPACK if msgpack else JSON
    return api.request(method, path, content=content,
                       headers={"content-type": content_type, "accept": JSON})


def nested_json(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def nested_msgpack(depth: int) -> bytes:
    return b"\x81\xa1a" * depth + b"\x01"  # {"a": {"a": ... 1}}


def upload(api: Api, run: int, data: bytes) -> Json:
    sha = hashlib.sha256(data).hexdigest()
    resp = api.request("PUT", f"/runs/{run}/blobs/{sha}", content=data,
                       headers={"content-type": "application/octet-stream"})
    assert resp.status_code in (200, 201), resp.text
    return {"path": "model.bin", "size": len(data), "sha256": sha}


# -- bodies nested too deeply ---------------------------------------------------------


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_a_body_nested_too_deeply_is_refused_with_422(api: Api, depth: int) -> None:
    project = unique_project("deep")
    run = api.create_ok(project)
    config = nested_json(depth)
    packed = nested_msgpack(depth)
    for method, path, content, content_type in [
        ("POST", "/runs", f'{{"project": "{project}", "config": {config}}}', JSON),
        ("PATCH", f"/runs/{run['id']}", f'{{"config": {config}}}', JSON),
        ("POST", "/runs", b"\x82\xa7project" + msgspec.msgpack.encode(project)
         + b"\xa6config" + packed, MSGPACK),
        ("PATCH", f"/runs/{run['id']}", b"\x81\xa6config" + packed, MSGPACK),
        ("POST", f"/runs/{run['id']}/checkpoints",
         f'{{"step": 0, "files": [], "metadata": {config}}}', JSON),
    ]:
        resp = api.request(method, path, content=content,
                           headers={"content-type": content_type, "accept": JSON})
        assert_error(resp, 422, "nested too deeply")
    assert api.get_ok(run["id"])["config"] == {}


def test_a_config_nested_hundreds_deep_is_still_stored(api: Api) -> None:
    project = unique_project("deep")
    resp = send(api, "POST", "/runs", f'{{"project": "{project}", "config": {nested_json(500)}}}')
    assert resp.status_code == 201, resp.text
    patched = send(api, "PATCH", f"/runs/{resp.json()['id']}",
                   f'{{"config": {nested_json(500)}}}')
    assert patched.status_code == 200, patched.text


# -- values JSON cannot store -----------------------------------------------------------


def test_a_msgpack_extension_value_is_refused_naming_its_key_path(api: Api) -> None:
    project = unique_project("ext")
    ext = msgspec.msgpack.Ext(5, b"ab")
    resp = send(api, "POST", "/runs",
                {"project": project, "config": {"optimizer": {"betas": [0.9, ext]}}})
    assert_error(resp, 422, "config.optimizer.betas[1]", "MessagePack extension value")
    run = api.create_ok(project)
    resp = send(api, "PATCH", f"/runs/{run['id']}", {"config": {"x": ext}})
    assert_error(resp, 422, "config.x", "MessagePack extension value")
    api.log(run["id"], {"loss": ramp(0, 1)})
    resp = send(api, "POST", f"/runs/{run['id']}/checkpoints",
                {"step": 0, "files": [upload(api, run["id"], b"weights")],
                 "metadata": {"epoch": 1, "rng": {"state": ext}}})
    assert_error(resp, 422, "metadata.rng.state", "MessagePack extension value")
    assert api.get_ok(run["id"])["config"] == {}
    assert api.request("GET", f"/runs/{run['id']}/checkpoints").json()["checkpoints"] == []


def test_a_map_key_json_cannot_store_is_refused_naming_where(api: Api) -> None:
    project = unique_project("keys")
    for key in [(1, 2), None, True]:
        resp = send(api, "POST", "/runs", {"project": project, "config": {"m": [{key: 1}]}})
        assert_error(resp, 422, "config.m[0] has a key", "use strings as keys")


def test_nan_and_infinity_in_config_are_kept_as_strings(api: Api,
                                                         shared_server: ServerProcess) -> None:
    """JSON has no NaN: they were stored as null, which reads as "no value was given"."""
    project = unique_project("nan")
    run = send(api, "POST", "/runs", {
        "project": project, "run_id": "nan",
        "config": {"lr": math.nan, "clip": math.inf, "floor": -math.inf,
                   "schedule": [1.0, math.nan, {"warmup": math.inf}]},
    })
    assert run.status_code == 201, run.text
    expected: Json = {"lr": "NaN", "clip": "Infinity", "floor": "-Infinity",
                "schedule": [1.0, "NaN", {"warmup": "Infinity"}]}
    assert run.json()["config"] == expected
    patched = send(api, "PATCH", f"/runs/{run.json()['id']}",
                   {"config": {"momentum": -math.inf, "lr": 0.1}})
    assert patched.status_code == 200, patched.text
    expected |= {"momentum": "-Infinity", "lr": 0.1}
    assert api.get_ok(run.json()["id"])["config"] == expected
    # The SDK reads such a config back (and sends NaN the same way itself).
    info = query.get_run("nan", project, url=shared_server.url)
    assert info.config == expected


# -- console lines ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [0, 3, -5, 3_000_000_000])
def test_a_log_line_on_a_stream_other_than_stdout_or_stderr_is_refused(
        api: Api, stream: int) -> None:
    project = unique_project("stream")
    run = api.create_ok(project)["id"]
    good = chunk(run, {"loss": ramp(0, 2)}, logs=[(1, "out"), (2, "err")])
    bad = chunk(run, logs=[(1, "fine"), (stream, "where does this go?")])
    resp = api.ingest(good, bad)
    assert_error(resp, 422, "chunk 1", "log line 1", f"stream {stream}", "1 (stdout)",
                 "2 (stderr)")
    assert api.logs(run).json()["lines"] == []  # the batch is refused whole
    api.ingest_ok(good)
    assert [line["stream"] for line in api.logs(run).json()["lines"]] == [1, 2]


# -- tags of forks ----------------------------------------------------------------------


def test_a_fork_inheriting_tags_past_the_limit_is_refused_naming_inherit_tags(
        api: Api) -> None:
    project = unique_project("tags")
    parent = api.create_ok(project, tags=[f"a{i}" for i in range(200)])
    api.log(parent["id"], {"loss": ramp(0, 10)})
    fork = {"fork_run_id": parent["display_id"], "fork_step": 5}
    resp = api.create(project, run_id="fork", inherit_tags=True,
                      tags=[f"b{i}" for i in range(100)], **fork)
    assert_error(resp, 422, "inherit_tags", "300 tags", f"limit of {MAX_TAGS}",
                 "pass fewer tags, or inherit_tags=False")
    assert api.get("fork", project).status_code == 404
    # Shared tags count once; up to the limit is fine.
    ok = api.create_ok(project, run_id="fork", inherit_tags=True,
                       tags=[f"a{i}" for i in range(100)] + [f"b{i}" for i in range(56)],
                       **fork)
    assert len(ok["tags"]) == MAX_TAGS


def test_a_run_over_the_tag_limit_still_takes_config_updates_and_removals(
        api: Api, database: Database) -> None:
    """A fork stored before the limit held on forks had more tags: every PATCH answered 422."""
    project = unique_project("tags")
    run = api.create_ok(project)["id"]
    too_many = [f"t{i}" for i in range(300)]
    with database.write() as conn:
        conn.execute(sa.update(runs).where(runs.c.id == run)
                     .values(tags=msgspec.json.encode(too_many).decode()))
    resp = api.patch(run, {"config": {"lr": 0.1}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["config"] == {"lr": 0.1}
    resp = api.patch(run, {"remove_tags": too_many[:10]})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["tags"]) == 290
    assert_error(api.patch(run, {"add_tags": ["one-more"]}), 422,
                 f"at most {MAX_TAGS} tags, got 291")
    resp = api.patch(run, {"add_tags": ["swap"], "remove_tags": too_many[10:20]})
    assert resp.status_code == 200, resp.text  # fewer than before: allowed
    assert len(resp.json()["tags"]) == 281


# -- logs search ---------------------------------------------------------------------


def test_log_search_ignores_case_in_any_script(api: Api, backend: str,
                                              database: Database) -> None:
    if backend == "postgres":
        with database.read() as conn:
            icu = conn.execute(sa.text(
                "SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'")).first()
        if icu is None:
            pytest.skip("this PostgreSQL has no ICU: search folds the case its locale folds")
    run = api.create_ok(unique_project("search"))["id"]
    lines = ["Ошибка: CUDA out of memory", "Épuisé", "100% done_ok", "plain"]
    api.ingest_ok(chunk(run, logs=[(1, line) for line in lines]))

    def found(q: str) -> list[str]:
        resp = api.logs(run, q=q)
        assert resp.status_code == 200, resp.text
        return [line["line"] for line in resp.json()["lines"]]

    assert found("cuda") == [lines[0]]
    assert found("ОШИБКА") == [lines[0]]
    assert found("ошибка: cuda") == [lines[0]]
    assert found("épuisé") == [lines[1]]
    assert found("ÉPUISÉ") == [lines[1]]
    assert found("% DONE_") == [lines[2]]  # LIKE's wildcards are plain text
    assert found("_") == [lines[2]]
    assert found("ПЛЮС") == []


# -- listing runs a page at a time -----------------------------------------------------


def test_runs_are_listed_a_page_at_a_time_with_a_cursor(api: Api) -> None:
    project = unique_project("pages")
    ids = [api.create_ok(project, run_id=f"r{i}")["id"] for i in range(5)]
    path = f"/projects/{project}/runs"

    first = api.request("GET", path, params={"limit": 2})
    assert first.status_code == 200, first.text
    assert [r["id"] for r in first.json()["runs"]] == ids[:2:-1][:2]
    cursor = first.json()["next_cursor"]
    assert isinstance(cursor, str)
    assert first.headers["link"] == f'<{"/api/v1" + path}?limit=2&cursor={cursor}>; rel="next"'
    api.create_ok(project, run_id="late")  # a run created while paging moves nothing
    second = api.request("GET", path, params={"limit": 2, "cursor": cursor}).json()
    assert [r["id"] for r in second["runs"]] == [ids[2], ids[1]]
    last = api.request("GET", path, params={"limit": 2, "cursor": second["next_cursor"]})
    assert [r["id"] for r in last.json()["runs"]] == [ids[0]]
    assert last.json()["next_cursor"] is None and "link" not in last.headers
    # Exactly a page's worth leaves nothing for a next one.
    assert api.request("GET", path, params={"limit": 6}).json()["next_cursor"] is None

    whole = api.request("GET", path).json()  # the answer of old: every run, no cursor
    assert len(whole["runs"]) == 6 and whole["next_cursor"] is None

    for bad in ["x", "-1", "1.5", "¹"]:
        assert_error(api.request("GET", path, params={"cursor": bad}), 422,
                     "next_cursor of the page before")
    for limit in [0, MAX_RUN_PAGE + 1]:
        assert_error(api.request("GET", path, params={"limit": limit}), 422, "limit")
    huge = api.request("GET", path, params={"cursor": "9" * 30}).json()
    assert len(huge["runs"]) == 6


def test_the_run_list_filters_by_external_id_never_read_as_another_kind_of_id(
        api: Api) -> None:
    project = unique_project("byid")
    first = api.create_ok(project, run_id="first")
    digits = api.create_ok(project, run_id=str(first["id"]))  # "<first's numeric id>"
    path = f"/projects/{project}/runs"
    for ref, expected in [(str(first["id"]), [digits["id"]]), ("first", [first["id"]]),
                          (first["display_id"], []), ("nobody", [])]:
        listed = api.request("GET", path, params={"run_id": ref}).json()["runs"]
        assert [r["id"] for r in listed] == expected, ref


# The page queries run on both backends above; following the pages is the SDK's and the CLI's
# doing, the same whatever the store: one backend (1001 runs take seconds to make).
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_every_run_past_one_page_reaches_the_sdk_and_the_cli(
        api: Api, shared_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    project = unique_project("many")
    count = MAX_RUN_PAGE + 1
    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(lambda i: api.create_ok(project, run_id=f"r{i}")["id"],
                                range(count)))
    page = api.request("GET", f"/projects/{project}/runs").json()
    assert len(page["runs"]) == MAX_RUN_PAGE and page["next_cursor"] is not None

    listed = query.list_runs(project, url=shared_server.url)
    assert [run.id for run in listed] == sorted(created, reverse=True)

    assert cli_main(["runs", project, "--url", shared_server.url]) == 0
    printed = capsys.readouterr().out
    oldest = min(listed, key=lambda run: run.id)
    assert f" {oldest.display_id} " in printed


def test_the_cli_prints_names_and_metadata_as_written_not_as_markup(
        api: Api, shared_server: ServerProcess, capsys: pytest.CaptureFixture[str],
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """rich reads "[...]" as markup: a run named "[/]oops" made ``pluto runs`` crash."""
    import pluto

    monkeypatch.setenv("COLUMNS", "300")  # one line per row: the name unwrapped
    project = unique_project("markup")
    name = "[/]oops [bold]x"
    run = pluto.init(project=project, name=name, dir=tmp_path / "pluto",
                     settings={"url": shared_server.url, "console": False})
    run.log({"a": 1.0}, step=1)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w")
    assert run.log_checkpoint(weights, step=1, metadata={"note": "[/red] done"}) is not None
    run.finish()
    url = ["--url", shared_server.url]
    assert cli_main(["runs", project, *url]) == 0
    assert name in capsys.readouterr().out
    assert cli_main(["lineage", run.display_id, "--project", project, *url]) == 0
    assert repr(name) in capsys.readouterr().out
    assert cli_main(["checkpoints", "list", run.display_id, "--project", project, *url]) == 0
    assert "note=[/red] done" in capsys.readouterr().out


# -- run links -----------------------------------------------------------------------


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:7300"),
    ("localhost", "http://localhost:7300"),
    ("::1", "http://[::1]:7300"),
    ("10.0.0.5", "http://10.0.0.5:7300"),
    ("2001:db8::5", "http://[2001:db8::5]:7300"),
    ("fe80::1%eth0", "http://[fe80::1%25eth0]:7300"),
    ("pluto.internal", "http://pluto.internal:7300"),
    ("0.0.0.0", "http://127.0.0.1:7300"),
    ("::", "http://127.0.0.1:7300"),
])
def test_run_links_start_with_the_address_the_server_listens_on(host: str, url: str) -> None:
    settings = ServerSettings(host=host)
    assert settings.base_url == url
    wildcard = host in ("0.0.0.0", "::")
    assert (settings.public_url_warning is not None) == wildcard
    if wildcard:
        assert "--public-url" in (settings.public_url_warning or "")
    public = ServerSettings(host=host, public_url="https://pluto.example.com/")
    assert public.base_url == "https://pluto.example.com"
    assert public.public_url_warning is None


def test_start_up_objects_are_frozen_out_of_the_garbage_collector(
        shared_server: ServerProcess) -> None:
    """A full collection walking FastAPI's routes, SQLAlchemy and the rest of start-up took
    50-80 ms in the middle of queries: the server freezes them once, as it starts."""
    frozen = re.findall(r"start-up objects frozen out of the garbage collector's walks: (\d+)",
                        shared_server.logs())
    assert len(frozen) == 1 and int(frozen[0]) > 10_000, shared_server.logs()
