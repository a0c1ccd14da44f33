"""API keys: ``pluto server --auth`` refuses every request without a valid key.

Keys are made with the real ``pluto keys create`` command, printed once and
stored only as a hash. A key limited to a project reaches nothing else. The
server runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa
from api_helpers import (
    Api,
    Json,
    assert_error,
    chunk,
    docs_page_assets,
    ramp,
    unique_project,
)
from support.server_process import ServerProcess, clean_env

from pluto_server.database import sqlite_url


@dataclass(frozen=True)
class Secured:
    """A server started with ``--auth``, with keys made by ``pluto keys create``."""

    server: ServerProcess
    storage: list[str]  # the --data-dir / --database-url flags the CLI needs
    database_url: str  # SQLAlchemy URL of its database
    admin_key: str
    scoped_key: str
    scoped_project: str
    revoked_key: str

    @property
    def url(self) -> str:
        return self.server.url


def pluto_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pluto", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def create_key(storage: list[str], name: str, *extra: str) -> str:
    done = pluto_cli("keys", "create", "--name", name, *extra, *storage)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"the key alone is printed on stdout: {done.stdout!r}"
    assert "cannot be shown again" in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def secured(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    data_dir = tmp_path_factory.mktemp(f"auth-{backend}") / "pluto-data"
    pg_url: str | None = request.getfixturevalue("pg_url") if backend == "postgres" else None
    storage = ["--database-url", pg_url] if pg_url else ["--data-dir", str(data_dir)]
    with ServerProcess(data_dir, database_url=pg_url, extra_args=["--auth"]) as server:
        scoped_project = unique_project("scoped")
        revoked = create_key(storage, "to-revoke")
        lookup = revoked.split("_")[1]
        done = pluto_cli("keys", "revoke", lookup, *storage)
        assert done.returncode == 0, done.stderr
        yield Secured(
            server=server,
            storage=storage,
            database_url=pg_url or sqlite_url(data_dir.resolve()),
            admin_key=create_key(storage, "ci"),
            scoped_key=create_key(storage, "team", "--project", scoped_project),
            scoped_project=scoped_project,
            revoked_key=revoked,
        )


@pytest.fixture(scope="module")
def admin(secured: Secured) -> Iterator[Api]:
    with Api(secured.url, key=secured.admin_key) as client:
        yield client


@pytest.fixture(scope="module")
def target(admin: Api) -> Json:
    """A run with points and a log line, made with the all-projects key."""
    run = admin.create_ok(unique_project("guarded"))
    admin.ingest_ok(chunk(run["id"], {"loss": ramp(0, 9)}, logs=[(1, "hello")]))
    return run


def every_route(run: Json) -> list[tuple[str, str, Json | None]]:
    ref = run["id"]
    return [
        ("POST", "/runs", {"project": run["project"], "run_id": "sneaky"}),
        ("GET", f"/runs/{ref}", None),
        ("PATCH", f"/runs/{ref}", {"config": {"hacked": True}}),
        ("POST", f"/runs/{ref}/finish", {"status": "FAILED"}),
        ("GET", f"/runs/{ref}/lineage", None),
        ("GET", f"/runs/{ref}/metrics", None),
        ("GET", f"/runs/{ref}/keys", None),
        ("GET", f"/runs/{ref}/logs", None),
        ("GET", "/projects", None),
        ("GET", f"/projects/{run['project']}/runs", None),
        ("POST", f"/runs/{ref}/blobs/missing", {"sha256": [SHA]}),
        ("GET", f"/runs/{ref}/checkpoints", None),
        ("GET", f"/runs/{ref}/files", None),
    ]


SHA = "ab" * 32


def file_routes(run: Json) -> list[tuple[str, str, Json | None]]:
    """Routes of files and checkpoints that a run without any cannot answer 200 to."""
    ref = run["id"]
    entry = {"path": "x", "size": 1, "sha256": SHA}
    return [
        ("PUT", f"/runs/{ref}/blobs/{SHA}", {"x": 1}),
        ("POST", f"/runs/{ref}/checkpoints", {"step": 1, "files": [entry]}),
        ("GET", f"/runs/{ref}/checkpoints/resolve", None),
        ("POST", f"/runs/{ref}/checkpoints/fork", {"from_run": str(ref)}),
        ("GET", f"/runs/{ref}/checkpoints/1/files/x", None),
        ("POST", f"/runs/{ref}/files", {"name": "x", "size": 1, "sha256": SHA}),
        ("GET", f"/runs/{ref}/files/x", None),
    ]


def ingest_body(run: Json) -> Json:
    return {
        "chunks": [
            {
                "run": run["id"],
                "session": "intruder",
                "seq": 0,
                "writer": 0,
                "keys": ["loss"],
                "key_index": [0],
                "steps": [99],
                "values": [1.0],
                "times": [0.0],
            }
        ]
    }


def test_health_needs_no_key_and_says_auth_is_on(secured: Secured) -> None:
    body = httpx.get(secured.url + "/api/v1/health", timeout=10).json()
    assert body["status"] == "ok" and body["auth"] is True


def test_the_api_docs_page_and_its_files_need_no_key(secured: Secured) -> None:
    """A browser sends no API key: the page, its Swagger UI files and the OpenAPI document
    (no data in any of them) are open, as the dashboard's page is."""
    docs_page_assets(secured.url)
    assert httpx.get(secured.url + "/api/openapi.json", timeout=10).status_code == 200


def test_every_route_refuses_a_request_without_a_key(secured: Secured, target: Json) -> None:
    with httpx.Client(base_url=secured.url + "/api/v1", timeout=30) as anonymous:
        for method, path, body in [*every_route(target), *file_routes(target),
                                   ("POST", "/ingest", ingest_body(target))]:
            resp = anonymous.request(method, path, json=body)
            assert_error(
                resp,
                401,
                "this server requires an API key",
                "Authorization: Bearer",
                "pluto keys create",
            )
            empty = anonymous.request(method, path, json=body, headers={"authorization": "Bearer"})
            assert empty.status_code == 401, (method, path)
    assert_unchanged(secured, target)


@pytest.mark.parametrize("which", ["garbage", "unknown-lookup", "wrong-secret", "revoked"])
def test_every_route_refuses_a_wrong_key(secured: Secured, target: Json, which: str) -> None:
    lookup = secured.admin_key.split("_")[1]
    key = {
        "garbage": "not-a-pluto-key",
        "unknown-lookup": "pluto_000000000000_" + "x" * 43,
        "wrong-secret": f"pluto_{lookup}_" + "x" * 43,
        "revoked": secured.revoked_key,
    }[which]
    with Api(secured.url, key=key) as intruder:
        for method, path, body in [*every_route(target), *file_routes(target),
                                   ("POST", "/ingest", ingest_body(target))]:
            assert_error(
                intruder.request(method, path, json=body),
                401,
                "the API key was not accepted",
                "unknown or revoked",
            )
        resp = intruder.request("GET", "/projects", headers={"authorization": "", "x-api-key": key})
        assert_error(resp, 401, "not accepted")
    assert_unchanged(secured, target)


def assert_unchanged(secured: Secured, run: Json) -> None:
    with Api(secured.url, key=secured.admin_key) as admin:
        now = admin.get_ok(run["id"])
        assert now["status"] == "RUNNING" and "hacked" not in now["config"]
        assert admin.one_series(run["id"], "loss").steps == list(range(10))
        listed = admin.request("GET", f"/projects/{run['project']}/runs").json()["runs"]
        assert [r["id"] for r in listed] == [run["id"]]  # no "sneaky" run was made


def test_a_key_from_pluto_keys_create_opens_every_route(secured: Secured) -> None:
    with Api(secured.url, key=secured.admin_key) as api:
        run = api.create_ok(unique_project("opened"), run_id="r")
        for method, path, body in every_route(run):
            resp = api.request(method, path, json=body)
            assert resp.status_code in (200, 201), (method, path, resp.text)
        resp = api.request("POST", "/ingest", json=ingest_body(run))
        assert resp.json() == {"applied": 1, "duplicates": 0, "points": 1}
    # X-API-Key works as well as Authorization: Bearer.
    resp = httpx.get(
        f"{secured.url}/api/v1/runs/{run['id']}",
        timeout=30,
        headers={"x-api-key": secured.admin_key},
    )
    assert resp.status_code == 200 and resp.json()["config"] == {"hacked": True}


def test_the_database_stores_only_a_hash_of_each_key(secured: Secured, backend: str) -> None:
    engine = sa.create_engine(secured.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM api_keys")).mappings()]
    finally:
        engine.dispose()
    assert {r["name"] for r in rows} >= {"ci", "team", "to-revoke"}
    for key in (secured.admin_key, secured.scoped_key, secured.revoked_key):
        secret = key.split("_", 2)[2]
        stored = " ".join(str(v) for r in rows for v in r.values())
        assert key not in stored and secret not in stored
        assert hashlib.sha256(key.encode()).hexdigest() in {r["secret_hash"] for r in rows}
    if backend == "sqlite":
        files = list(secured.server.data_dir.glob("pluto.db*"))
        assert files
        raw = b"".join(path.read_bytes() for path in files)
        for key in (secured.admin_key, secured.scoped_key):
            assert key.split("_", 2)[2].encode() not in raw


def test_keys_list_never_prints_a_secret(secured: Secured) -> None:
    done = pluto_cli("keys", "list", *secured.storage)
    assert done.returncode == 0, done.stderr
    assert "team" in done.stdout and "to-revoke" in done.stdout
    for key in (secured.admin_key, secured.scoped_key):
        assert key.split("_", 2)[2][:12] not in done.stdout


def test_a_project_scoped_key_reaches_only_its_project(secured: Secured, target: Json) -> None:
    mine = secured.scoped_project
    with Api(secured.url, key=secured.scoped_key) as team:
        own = team.create(mine, run_id="ours")
        assert own.status_code == 201, own.text
        own_run = own.json()
        assert team.ingest_ok(chunk(own_run["id"], {"loss": ramp(0, 4)}))["applied"] == 1
        assert team.one_series("ours", "loss", project=mine).steps == list(range(5))

        for method, path, body in [*every_route(target), *file_routes(target)]:
            if path == "/projects":
                continue
            text = assert_error(
                team.request(method, path, json=body), 403, f"limited to project {mine!r}"
            )
            if target["project"] not in path and not (body and "project" in body):
                assert target["project"] not in text  # no other project's name is revealed
        # A batch touching another project's run is refused whole.
        mixed = team.ingest(
            chunk(own_run["id"], {"loss": ramp(5, 9)}), chunk(target["id"], {"loss": [(99, 1.0)]})
        )
        assert_error(mixed, 403, f"limited to project {mine!r}")
        names = [p["name"] for p in team.request("GET", "/projects").json()["projects"]]
        assert names == [mine]
        # Resuming or forking another project's run by a ref that exists there: refused
        # without naming that project.
        refs = [str(target["id"]), target["display_id"]]
        for ref in refs:
            for body in [{"run_id": ref, "resume": True}, {"fork_run_id": ref, "fork_step": 1}]:
                answer = team.request("POST", "/runs", json={"project": mine, **body})
                assert answer.status_code in (400, 404), answer.text
                assert target["project"] not in answer.text, (body, answer.text)
        assert team.one_series("ours", "loss", project=mine).steps == list(range(5))
    assert_unchanged(secured, target)


def test_a_server_reachable_beyond_loopback_requires_a_key_without_auth_flag(
    server_factory: Callable[..., ServerProcess], backend: str, request: pytest.FixtureRequest
) -> None:
    fresh: str | None = request.getfixturevalue("fresh_pg_url") if backend == "postgres" else None
    exposed = server_factory(fresh, host="0.0.0.0")  # no --auth, and no key made yet
    health = httpx.get(exposed.url + "/api/v1/health", timeout=10).json()
    assert health["auth"] is True
    with Api(exposed.url) as anonymous:
        assert_error(anonymous.request("GET", "/projects"), 401, "requires an API key")
        assert_error(anonymous.create(unique_project()), 401, "requires an API key")
    assert "no API key exists" in exposed.logs()  # and the operator is told how to make one


def test_a_project_cannot_name_another_projects_blob_by_its_sha256(
        secured: Secured, admin: Api) -> None:
    """Blobs are stored once for the server. A key limited to one project that learnt the
    SHA-256 of another project's weights could commit them as its own file and download
    them (found by a security review): it must upload the bytes itself first."""
    secret = b"weights of another team " * 100
    sha = hashlib.sha256(secret).hexdigest()
    theirs = admin.create_ok(unique_project("theirs"))
    stored = admin.request("PUT", f"/runs/{theirs['id']}/blobs/{sha}", content=secret)
    assert stored.status_code == 201, stored.text
    committed = admin.request("POST", f"/runs/{theirs['id']}/files",
                              json={"name": "w.bin", "sha256": sha, "size": len(secret)})
    assert committed.status_code == 201, committed.text

    with Api(secured.url, key=secured.scoped_key) as scoped:
        ours = scoped.create_ok(secured.scoped_project)["id"]
        missing = scoped.request("POST", f"/runs/{ours}/blobs/missing", json={"sha256": [sha]})
        assert missing.json() == {"missing": [sha]}, "another project's blob is not ours"
        for size in (1, len(secret)):  # a wrong size must not tell the real one either
            taken = scoped.request("POST", f"/runs/{ours}/files",
                                   json={"name": "stolen.bin", "sha256": sha, "size": size})
            assert taken.status_code == 409, taken.text
            assert str(len(secret)) not in taken.text and "were not uploaded" in taken.text
        as_checkpoint = scoped.request("POST", f"/runs/{ours}/checkpoints", json={
            "step": 0, "files": [{"path": "w.bin", "sha256": sha, "size": len(secret)}]})
        assert as_checkpoint.status_code == 409, as_checkpoint.text
        assert scoped.request("GET", f"/runs/{ours}/files/stolen.bin").status_code == 404

        # With the bytes in hand it is its own blob (stored once all the same).
        uploaded = scoped.request("PUT", f"/runs/{ours}/blobs/{sha}", content=secret)
        assert uploaded.status_code == 201, uploaded.text
        mine = scoped.request("POST", f"/runs/{ours}/files",
                              json={"name": "mine.bin", "sha256": sha, "size": len(secret)})
        assert mine.status_code == 201, mine.text
        assert scoped.request("GET", f"/runs/{ours}/files/mine.bin").content == secret


def test_a_scoped_key_ingesting_into_another_project_is_not_told_its_name(
        secured: Secured, admin: Api) -> None:
    """Run ids are small integers: naming each one's project in the refusal listed every
    project on the server (found by a security review)."""
    hidden = unique_project("hidden-name")
    theirs = admin.create_ok(hidden)["id"]
    with Api(secured.url, key=secured.scoped_key) as scoped:
        refused = scoped.request("POST", "/ingest", json={"chunks": [
            {"run": theirs, "session": "s", "seq": 0, "writer": 0}]})
    assert refused.status_code == 403, refused.text
    assert f"cannot reach run {theirs}" in refused.text and hidden not in refused.text


def test_a_scoped_key_cannot_import_from_an_s3_bucket(secured: Secured) -> None:
    """The server reads the bucket with its own credentials, which reach other teams'
    buckets too: an ART import needs a key not limited to a project."""
    with Api(secured.url, key=secured.scoped_key) as scoped:
        ours = scoped.create_ok(secured.scoped_project)["id"]
        refused = scoped.request("POST", f"/runs/{ours}/checkpoints/fork", json={
            "from_run": "agent-007", "from_project": "email-agent",
            "from_s3_bucket": "someone-elses-bucket"})
    assert refused.status_code == 403, refused.text
    assert "from_s3_bucket" in refused.text and "not limited to a project" in refused.text
