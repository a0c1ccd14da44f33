"""The API as a whole: its OpenAPI document, its codecs, its errors, its schema migrations.

Route-specific behaviour lives in ``test_server_runs``, ``test_server_ingest``,
``test_server_queries`` and ``test_server_auth``; this module pins what every
route shares. Everything runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from api_helpers import (
    Api,
    Json,
    assert_error,
    chunk,
    docs_page_assets,
    ramp,
    unique_project,
)
from support.server_process import ServerProcess

from pluto import wire
from pluto.wire import JSON, MSGPACK, RunAttached, RunCreate, encode_msgpack
from pluto_server.database import Database, sqlite_url
from pluto_server.schema import metadata


@pytest.fixture(scope="module")
def api(shared_server: ServerProcess) -> Iterator[Api]:
    with Api(shared_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(shared_server: ServerProcess) -> Json:
    resp = httpx.get(shared_server.url + "/api/openapi.json", timeout=30)
    assert resp.status_code == 200
    document: Json = resp.json()
    return document


# -- OpenAPI -----------------------------------------------------------------------------

ROUTES = {
    ("get", "/api/v1/health"),
    ("post", "/api/v1/runs"),
    ("get", "/api/v1/runs/{ref}"),
    ("patch", "/api/v1/runs/{ref}"),
    ("post", "/api/v1/runs/{ref}/finish"),
    ("get", "/api/v1/runs/{ref}/lineage"),
    ("post", "/api/v1/ingest"),
    ("get", "/api/v1/runs/{ref}/metrics"),
    ("get", "/api/v1/runs/{ref}/keys"),
    ("get", "/api/v1/runs/{ref}/logs"),
    ("get", "/api/v1/projects"),
    ("get", "/api/v1/projects/{project}/runs"),
    ("post", "/api/v1/runs/{ref}/blobs/missing"),
    ("put", "/api/v1/runs/{ref}/blobs/{sha256}"),
    ("post", "/api/v1/runs/{ref}/checkpoints"),
    ("get", "/api/v1/runs/{ref}/checkpoints"),
    ("get", "/api/v1/runs/{ref}/checkpoints/resolve"),
    ("post", "/api/v1/runs/{ref}/checkpoints/fork"),
    ("get", "/api/v1/runs/{ref}/checkpoints/{step}/files/{path}"),
    ("post", "/api/v1/runs/{ref}/files"),
    ("get", "/api/v1/runs/{ref}/files"),
    ("get", "/api/v1/runs/{ref}/files/{name}"),
}

BODIES = {
    ("post", "/api/v1/runs"): ("RunCreate", "RunAttached"),
    ("patch", "/api/v1/runs/{ref}"): ("RunUpdate", "RunInfo"),
    ("post", "/api/v1/runs/{ref}/finish"): ("RunFinish", "RunInfo"),
    ("post", "/api/v1/ingest"): ("IngestBatch", "IngestResult"),
    ("get", "/api/v1/runs/{ref}"): (None, "RunInfo"),
    ("get", "/api/v1/runs/{ref}/lineage"): (None, "Lineage"),
    ("get", "/api/v1/runs/{ref}/metrics"): (None, "MetricQueryResult"),
    ("get", "/api/v1/runs/{ref}/keys"): (None, "MetricKeys"),
    ("get", "/api/v1/runs/{ref}/logs"): (None, "LogPage"),
    ("get", "/api/v1/projects"): (None, "ProjectList"),
    ("get", "/api/v1/projects/{project}/runs"): (None, "RunList"),
    ("post", "/api/v1/runs/{ref}/blobs/missing"): ("BlobCheck", "BlobsMissing"),
    ("post", "/api/v1/runs/{ref}/checkpoints"): ("CheckpointCreate", "CheckpointInfo"),
    ("get", "/api/v1/runs/{ref}/checkpoints"): (None, "CheckpointList"),
    ("get", "/api/v1/runs/{ref}/checkpoints/resolve"): (None, "CheckpointInfo"),
    ("post", "/api/v1/runs/{ref}/checkpoints/fork"): ("CheckpointFork", "CheckpointInfo"),
    ("post", "/api/v1/runs/{ref}/files"): ("FileCreate", "FileInfo"),
    ("get", "/api/v1/runs/{ref}/files"): (None, "FileList"),
}


def operations(document: Json) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_openapi_document_lists_every_route(openapi: Json) -> None:
    assert openapi["openapi"].startswith("3.")
    assert operations(openapi) == ROUTES


@pytest.mark.parametrize(("operation", "schemas"), sorted(BODIES.items()))
def test_each_route_documents_its_wire_body_and_answer(
    openapi: Json, operation: tuple[str, str], schemas: tuple[str | None, str]
) -> None:
    method, path = operation
    body, reply = schemas
    spec = openapi["paths"][path][method]
    if body is not None:
        content = spec["requestBody"]["content"]
        if body == "IngestBatch":  # as JSON, NaN and Infinity travel as strings
            assert content[MSGPACK]["schema"] == {"$ref": "#/components/schemas/IngestBatch"}
            assert content[JSON]["schema"] == {"$ref": "#/components/schemas/JsonIngestBatch"}
        else:
            assert content[JSON]["schema"] == {"$ref": f"#/components/schemas/{body}"}
    ok = spec["responses"]["200"]["content"][JSON]["schema"]
    assert ok == {"$ref": f"#/components/schemas/{reply}"}
    for code in ("401", "404", "422"):
        error = spec["responses"][code]["content"][JSON]["schema"]
        assert error == {"$ref": "#/components/schemas/ApiError"}


def test_the_components_are_the_msgspec_schemas_of_pluto_wire(openapi: Json) -> None:
    schemas = openapi["components"]["schemas"]
    wire_structs = [
        name
        for name, value in vars(wire).items()
        if isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == wire.__name__
        and name not in ("Body", "Reply", "ChunkHeader")  # base classes, never a body
        and value not in wire.SOCKET_ONLY  # sidecar frames: documented in docs/sidecar.md
    ]
    assert {"RunCreate", "IngestBatch", "Chunk", "MetricSeries", "Lineage"} <= set(wire_structs)
    missing = sorted(set(wire_structs) - set(schemas))
    assert missing == []
    assert sorted(schemas["RunStatus"]["enum"]) == ["COMPLETED", "FAILED", "RUNNING", "TERMINATED"]

    # The documented schema is exactly what msgspec validates with.
    _, generated = msgspec.json.schema_components(
        [RunCreate, RunAttached], ref_template="#/components/schemas/{name}"
    )
    assert schemas["RunCreate"] == generated["RunCreate"]
    assert schemas["RunCreate"]["required"] == ["project"]
    assert schemas["RunCreate"]["additionalProperties"] is False  # typos are errors
    chunks = schemas["IngestBatch"]["properties"]["chunks"]
    assert chunks["items"] == {"$ref": "#/components/schemas/Chunk"}


def test_every_reference_in_the_openapi_document_resolves(openapi: Json) -> None:
    schemas = openapi["components"]["schemas"]
    dangling = sorted(
        {ref for ref in refs(openapi) if ref.removeprefix("#/components/schemas/") not in schemas}
    )
    assert dangling == []


def test_create_run_documents_both_its_success_codes(openapi: Json) -> None:
    responses = openapi["paths"]["/api/v1/runs"]["post"]["responses"]
    assert {"200", "201"} <= set(responses)


def test_every_operation_documents_its_errors_as_the_server_answers_them(openapi: Json) -> None:
    # Every error is {"detail": "..."} (ApiError); FastAPI's own 422 schema (a list of pydantic
    # errors) documented an answer this server never gives, and routes FastAPI documented by
    # itself listed no 400 although they give one (Schemathesis' conformance checks).
    error = {"$ref": "#/components/schemas/ApiError"}
    for (method, path) in sorted(ROUTES):
        responses = openapi["paths"][path][method]["responses"]
        for code in ("400", "401", "403", "404", "409", "413", "422"):
            assert responses[code]["content"][JSON]["schema"] == error, (method, path, code)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_the_interactive_docs_are_served_with_their_files(shared_server: ServerProcess) -> None:
    assert any(asset.endswith(".js") for asset in docs_page_assets(shared_server.url))


# -- codecs --------------------------------------------------------------------------------


def test_run_bodies_may_be_msgpack_both_ways(api: Api) -> None:
    project = unique_project()
    resp = api.request(
        "POST",
        "/runs",
        content=encode_msgpack(RunCreate(project=project, run_id="mp", config={"a": [1, 2]})),
        headers={"content-type": MSGPACK, "accept": MSGPACK},
    )
    assert resp.status_code == 201
    assert resp.headers["content-type"].startswith(MSGPACK)
    run = msgspec.msgpack.decode(resp.content, type=RunAttached)
    assert (run.project, run.run_id, run.config, run.resumed) == (
        project,
        "mp",
        {"a": [1, 2]},
        False,
    )
    info = api.request("GET", f"/runs/{run.id}", headers={"accept": MSGPACK})
    assert msgspec.msgpack.decode(info.content, type=wire.RunInfo).id == run.id


# -- bad create requests ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["has space", "-leading-dash", "", "x" * 101, "slash/name"])
def test_an_invalid_project_name_is_refused_with_the_rule(api: Api, name: str) -> None:
    assert_error(
        api.create(name), 422, "project name", "is not valid", "letters, digits, '.', '_' or '-'"
    )


@pytest.mark.parametrize("run_id", ["has space", "-x", "x" * 129])
def test_an_invalid_run_id_is_refused_with_the_rule(api: Api, run_id: str) -> None:
    assert_error(api.create(unique_project(), run_id=run_id), 422, "run_id", "is not valid")


@pytest.mark.parametrize(
    ("fields", "phrases"),
    [
        ({"projct": "typo"}, ("unknown field", "projct")),
        ({"run_idd": "x"}, ("unknown field", "run_idd")),
        ({"tags": "not-a-list"}, ("Expected `array | null`", "$.tags")),
        ({"fork_step": "50"}, ("Expected `int | null`", "$.fork_step")),
        ({"config": [1, 2]}, ("Expected `object | null`", "$.config")),
        ({"resume": "yes"}, ("Expected `bool`", "$.resume")),
    ],
)
def test_a_create_body_with_a_typo_or_wrong_type_is_422_naming_the_field(
    api: Api, fields: Json, phrases: tuple[str, ...]
) -> None:
    assert_error(api.create(unique_project(), **fields), 422, "invalid RunCreate", *phrases)


def test_a_create_body_that_is_not_json_is_422(api: Api) -> None:
    resp = api.request(
        "POST", "/runs", content=b'{"project": "x",', headers={"content-type": "application/json"}
    )
    assert_error(resp, 422, "the body is not valid JSON")
    resp = api.request(
        "POST", "/runs", content=b'["project"]', headers={"content-type": "application/json"}
    )
    assert_error(resp, 422, "invalid RunCreate", "Expected `object`")
    assert_error(api.request("POST", "/runs", json={}), 422, "missing required field `project`")


def test_health_reports_the_backend(shared_server: ServerProcess, backend: str) -> None:
    body = httpx.get(shared_server.url + "/api/v1/health", timeout=10).json()
    assert body["status"] == "ok"
    assert body["database"] == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
    assert body["auth"] is False


# -- errors every route shares ----------------------------------------------------------------


@pytest.fixture(scope="module")
def some_run(api: Api) -> Json:
    run = api.create_ok(unique_project())
    api.log(run["id"], {"loss": ramp(0, 3)})
    return run


BODY_ROUTES = [
    ("POST", "/runs", "RunCreate"),
    ("PATCH", "/runs/{id}", "RunUpdate"),
    ("POST", "/runs/{id}/finish", "RunFinish"),
    ("POST", "/ingest", "IngestBatch"),
]


@pytest.mark.parametrize(("method", "path", "kind"), BODY_ROUTES)
def test_every_body_route_refuses_malformed_json_typos_and_wrong_types(
    api: Api, some_run: Json, method: str, path: str, kind: str
) -> None:
    url = path.format(id=some_run["id"])
    headers = {"content-type": JSON}
    assert_error(
        api.request(method, url, content=b"{oops", headers=headers),
        422,
        "the body is not valid JSON",
    )
    assert_error(
        api.request(method, url, content=b"", headers=headers), 422, "the body is not valid JSON"
    )
    assert_error(
        api.request(method, url, json={"bogus_field": 1}),
        422,
        f"invalid {kind}",
        "unknown field `bogus_field`",
    )
    assert_error(
        api.request(method, url, json=[1, 2]),
        422,
        f"invalid {kind}",
        "Expected `object`, got `array`",
    )
    assert_error(
        api.request(method, url, content=b"\x93\x01\x02\x03", headers={"content-type": MSGPACK}),
        422,
        f"invalid {kind}",
        "Expected `object`",
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/runs/{ref}"),
        ("PATCH", "/runs/{ref}"),
        ("POST", "/runs/{ref}/finish"),
        ("GET", "/runs/{ref}/lineage"),
        ("GET", "/runs/{ref}/metrics"),
        ("GET", "/runs/{ref}/keys"),
        ("GET", "/runs/{ref}/logs"),
    ],
)
def test_every_run_route_answers_404_for_an_unknown_run(api: Api, method: str, path: str) -> None:
    body: Json | None = {} if method != "GET" else None
    for ref in ("999999999", "no-such-run"):
        resp = api.request(method, path.format(ref=ref), json=body)
        assert_error(resp, 404, "does not exist")


@pytest.mark.parametrize("ref", ["\u00b9", "\u2460", "\u0663", "1\u00b2"])
def test_a_ref_of_digits_int_refuses_is_404_not_a_crash(
    api: Api, some_run: Json, ref: str
) -> None:
    """str.isdigit() is true for "¹" and "①", which int() refuses: such a ref once reached
    int() and answered 500 (found by the schemathesis run, from a fork's from_run)."""
    assert_error(api.request("GET", f"/runs/{quote(ref)}"), 404, "does not exist")
    fork = {"project": unique_project(), "fork_run_id": ref, "fork_step": 1}
    assert_error(api.request("POST", "/runs", json=fork), 404, "does not exist")
    checkpoint_fork = {"from_run": ref}
    resp = api.request("POST", f"/runs/{some_run['id']}/checkpoints/fork", json=checkpoint_fork)
    assert_error(resp, 404, "does not exist")


def test_an_unknown_project_is_404(api: Api) -> None:
    assert_error(
        api.request("GET", f"/projects/{unique_project()}/runs"),
        404,
        "does not exist",
        "created by its first run",
    )


def test_an_empty_ingest_batch_is_a_no_op(api: Api, some_run: Json) -> None:
    assert api.ingest_ok() == {"applied": 0, "duplicates": 0, "points": 0}
    assert api.ingest_ok(chunk(some_run["id"]))["applied"] == 1  # an empty chunk, still once


# -- migrations -----------------------------------------------------------------------------------


@pytest.fixture
def empty_database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "postgres":
        url: str = request.getfixturevalue("fresh_pg_url")
        return url
    return sqlite_url(tmp_path)


def schema_snapshot(database: Database) -> Json:
    with database.engine.connect() as conn:
        inspector = sa.inspect(conn)
        return {
            table: {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)
                ],
                "indexes": sorted(
                    (i["name"] or "", tuple(i["column_names"]))
                    for i in inspector.get_indexes(table)
                ),
                "unique": sorted(
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
                ),
                "pk": inspector.get_pk_constraint(table)["constrained_columns"],
                "fks": sorted(
                    (tuple(f["constrained_columns"]), f["referred_table"])
                    for f in inspector.get_foreign_keys(table)
                ),
            }
            for table in sorted(inspector.get_table_names())
        }


def test_the_migrated_schema_matches_the_table_definitions(empty_database_url: str) -> None:
    database = Database(empty_database_url)
    try:
        database.migrate()
        with database.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
            tables = set(sa.inspect(conn).get_table_names())
        assert differences == []
        assert tables == set(metadata.tables) | {"alembic_version"}
        assert database.schema_revision() == "0003"
    finally:
        database.dispose()


def test_upgrading_to_blobs_per_project_keeps_every_file_and_checkpoint_reachable(
        empty_database_url: str) -> None:
    """Revision 0003 grants each project the blobs its runs' files and checkpoints already
    name, and no other: an upload nobody committed belongs to no project."""
    database = Database(empty_database_url)
    try:
        database.migrate("0002")
        shas = {name: hashlib.sha256(name.encode()).hexdigest()
                for name in ("file", "ckpt", "shared", "orphan")}
        with database.write() as conn:
            def insert(table: str, **row: object) -> None:
                conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                                     f"({', '.join(':' + k for k in row)})"), row)

            for project in (1, 2):
                insert("projects", id=project, name=f"p{project}", prefix="P",
                       run_counter=1, created_at=1.0)
                insert("runs", id=project, project_id=project, name="r", config="{}",
                       tags="[]", status="RUNNING", created_at=1.0, updated_at=1.0)
            for sha in shas.values():
                insert("blobs", sha256=sha, size=4, created_at=1.0)
            insert("run_files", run_id=1, name="f", size=4, sha256=shas["file"],
                   created_at=1.0)
            insert("run_files", run_id=1, name="s", size=4, sha256=shas["shared"],
                   created_at=1.0)
            insert("checkpoints", id=1, run_id=2, step=0, size=8, metadata="{}",
                   created_at=1.0)
            for path, sha in (("c", shas["ckpt"]), ("s", shas["shared"])):
                insert("checkpoint_files", checkpoint_id=1, path=path, size=4, sha256=sha)
        database.migrate()
        assert database.schema_revision() == "0003"
        with database.read() as conn:
            granted = {(int(project), str(sha)) for project, sha in conn.execute(
                sa.text("SELECT project_id, sha256 FROM project_blobs"))}
        assert granted == {(1, shas["file"]), (1, shas["shared"]), (2, shas["ckpt"]),
                           (2, shas["shared"])}
    finally:
        database.dispose()


def test_migrating_again_changes_nothing_and_keeps_the_data(empty_database_url: str) -> None:
    database = Database(empty_database_url)
    try:
        database.migrate()
        with database.write() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO projects (name, prefix, run_counter, created_at) "
                    "VALUES ('kept', 'KEP', 3, 1.0)"
                )
            )
        before = schema_snapshot(database)
        database.migrate()
        second = Database(empty_database_url)  # as a second server starting on it would
        try:
            second.migrate()
        finally:
            second.dispose()
        assert schema_snapshot(database) == before
        assert database.schema_revision() == "0003"
        with database.read() as conn:
            rows = conn.execute(sa.text("SELECT name, run_counter FROM projects")).all()
            versions = conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar()
        assert [tuple(r) for r in rows] == [("kept", 3)]
        assert versions == 1
    finally:
        database.dispose()


# -- integers out of range -------------------------------------------------------------------

OUT_OF_RANGE_PARAMS: list[tuple[str, str]] = [
    ("ref-2**40", "/runs/1099511627776"),
    ("ref-10**23", "/runs/100000000000000000000000"),
    ("metrics-writer", "/runs/{id}/metrics?writer=100000000000000000000000"),
    ("metrics-step-min", "/runs/{id}/metrics?step_min=100000000000000000000000"),
    ("logs-after", "/runs/{id}/logs?after=100000000000000000000000"),
    ("logs-writer", "/runs/{id}/logs?writer=100000000000000000000000"),
]


@pytest.mark.parametrize(
    ("case", "path"), OUT_OF_RANGE_PARAMS, ids=[case[0] for case in OUT_OF_RANGE_PARAMS]
)
def test_huge_integers_in_urls_are_answered_not_crashed_on(
    api: Api,
    some_run: Json,
    backend: str,
    request: pytest.FixtureRequest,
    case: str,
    path: str,
) -> None:
    resp = api.request("GET", path.format(id=some_run["id"]))
    assert resp.status_code < 500, f"{case}: {resp.status_code} {resp.text}"
    if case.startswith("ref"):
        assert_error(resp, 404, "does not exist")
    elif resp.status_code == 200:
        body = resp.json()
        assert body.get("series", []) == [] and body.get("lines", []) == []


# -- compressed answers ----------------------------------------------------------------


def test_json_answers_are_gzipped_for_clients_that_take_it_downloads_and_msgpack_never(
        api: Api, shared_server: ServerProcess) -> None:
    run = api.create_ok(unique_project("gzip"))
    api.ingest(chunk(run["id"], {"loss": ramp(0, 4999, lambda step: 1 / (step + 1))})
               ).raise_for_status()
    metrics = f"/runs/{run['id']}/metrics"

    def fetch(path: str, coding: str, client: httpx.Client = api.client) -> httpx.Response:
        return client.get(path, headers={"accept-encoding": coding})

    plain, gzipped = fetch(metrics, "identity"), fetch(metrics, "gzip")
    assert "content-encoding" not in plain.headers
    assert gzipped.headers["content-encoding"] == "gzip"
    assert gzipped.headers["vary"] == "Accept-Encoding"
    assert gzipped.content == plain.content  # httpx decompressed it
    assert gzipped.num_bytes_downloaded < len(plain.content) / 2
    # A small answer is not worth it.
    assert "content-encoding" not in fetch(f"/runs/{run['id']}", "gzip").headers
    # Nor is MessagePack, which programs ask for.
    packed = api.client.get(metrics, headers={"accept-encoding": "gzip", "accept": MSGPACK})
    assert packed.headers["content-type"] == MSGPACK
    assert "content-encoding" not in packed.headers
    assert packed.num_bytes_downloaded == len(packed.content) > 1024

    # A file's bytes come as stored, with their length, however the client asks.
    data = b"0123456789abcdef" * 20_000  # 320 KB that would compress to almost nothing
    sha = hashlib.sha256(data).hexdigest()
    api.request("PUT", f"/runs/{run['id']}/blobs/{sha}", content=data,
                headers={"content-type": "application/octet-stream"}).raise_for_status()
    api.request("POST", f"/runs/{run['id']}/files",
                json={"name": "weights.bin", "size": len(data), "sha256": sha}
                ).raise_for_status()
    download = fetch(f"/runs/{run['id']}/files/weights.bin", "gzip")
    assert download.status_code == 200, download.text
    assert "content-encoding" not in download.headers
    assert download.headers["content-length"] == str(len(data))
    assert download.content == data
    assert download.num_bytes_downloaded == len(data)

    # The dashboard's biggest asset, plotly.js, goes gzipped to a browser.
    with httpx.Client(base_url=shared_server.url, timeout=30) as browser:
        plotly = fetch("/static/vendor/plotly.min.js", "gzip, deflate, br, zstd", browser)
    assert plotly.status_code == 200
    assert plotly.headers["content-encoding"] == "gzip"
    assert plotly.num_bytes_downloaded < len(plotly.content) / 2
