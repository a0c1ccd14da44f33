"""The test infrastructure itself: real PostgreSQL, real server processes.

If these fail, every other suite's failures are suspect, so they pin what the
fixtures promise: a working, isolated database per module on a loopback-only
cluster, and a server process that is waited for, restarted on the same port,
stopped with SIGTERM (SIGKILL if it hangs), and whose output explains why it
did not start.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
from support.postgres import PostgresCluster, libpq_url
from support.server_process import HEALTH_PATH, ServerProcess, ServerStartError, env_for

# -- PostgreSQL ----------------------------------------------------------------------


@pytest.mark.postgres
def test_pg_url_is_a_working_database(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://pluto@127.0.0.1:")
    with psycopg.connect(libpq_url(pg_url)) as conn:
        conn.execute("CREATE TABLE smoke (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO smoke (name) VALUES (%s), (%s)", ("a", "b"))
        conn.commit()
    with psycopg.connect(libpq_url(pg_url)) as conn:
        rows = conn.execute("SELECT name FROM smoke ORDER BY id").fetchall()
    assert rows == [("a",), ("b",)]


@pytest.mark.postgres
def test_each_database_is_isolated(pg_cluster: PostgresCluster, pg_url: str) -> None:
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS only_here (x int)")
    other = pg_cluster.create_database("other")
    assert other != pg_url
    with psycopg.connect(libpq_url(other)) as conn:
        found = conn.execute("SELECT to_regclass('only_here')").fetchone()
    assert found == (None,)


@pytest.mark.postgres
def test_cluster_listens_on_loopback_only(pg_cluster: PostgresCluster) -> None:
    with psycopg.connect(pg_cluster.libpq_url()) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row == ("127.0.0.1",)
    assert pg_cluster.running and pg_cluster.pid is not None


# -- ServerProcess mechanics, against a stand-in process ------------------------------

# A tiny health endpoint in a real subprocess, so the start/stop/restart logic is
# checked without depending on the tracking server's own code.
STAND_IN = r"""
import http.server, json, signal, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
if mode == "crash":
    print("boom: cannot open the database", file=sys.stderr)
    sys.exit(3)
if mode == "silent":
    time.sleep(600)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(0.3)  # not ready at once: the caller must wait

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200 if self.path == "/api/v1/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def stand_in(tmp_path: Path, mode: str = "ok", startup_timeout: float = 60.0) -> ServerProcess:
    return ServerProcess(
        tmp_path / "data",
        command=lambda proc: [sys.executable, "-c", STAND_IN, mode, str(proc.port)],
        startup_timeout=startup_timeout,
    )


def test_server_process_waits_restarts_on_same_port_and_kills(tmp_path: Path) -> None:
    proc = stand_in(tmp_path).start()
    try:
        port = proc.port
        assert proc.healthy()
        assert proc.stop() == 0  # SIGTERM, clean exit
        assert not proc.healthy()

        proc.start()
        assert proc.port == port and proc.healthy()
        assert proc.kill() == -signal.SIGKILL
        assert not proc.running

        proc.restart()
        assert proc.healthy() and proc.starts == 3
    finally:
        proc.stop()


def test_start_failure_carries_the_server_output(tmp_path: Path) -> None:
    proc = stand_in(tmp_path, "crash")
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: cannot open"):
        proc.start()


def test_start_times_out_and_kills_a_server_that_never_answers(tmp_path: Path) -> None:
    proc = stand_in(tmp_path, "silent", startup_timeout=1.0)
    with pytest.raises(ServerStartError, match="not healthy"):
        proc.start()
    assert not proc.running


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    proc = stand_in(tmp_path, "stubborn").start()
    assert proc.stop(timeout=1.0) == -signal.SIGKILL


def test_env_for_points_at_the_server_and_drops_inherited_pluto_vars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLUTO_RUN_ID", "leaked-from-the-developer")
    monkeypatch.setenv("MLOP_RUN_ID", "leaked-too")
    proc = ServerProcess(tmp_path / "data", port=7399)
    env = env_for(proc, PLUTO_PROJECT="p")
    assert env["PLUTO_URL"] == "http://127.0.0.1:7399"
    assert env["PLUTO_PROJECT"] == "p"
    assert "PLUTO_RUN_ID" not in env and "MLOP_RUN_ID" not in env


# -- the real tracking server -----------------------------------------------------------


def test_server_answers_health(server: ServerProcess, backend: str) -> None:
    resp = httpx.get(server.url + HEALTH_PATH, timeout=5)
    assert resp.status_code == 200
    assert isinstance(resp.json(), dict)
    assert server.backend == backend
    assert server.host == "127.0.0.1"
    if backend == "postgres":
        assert server.database_url is not None
        assert server.database_url.startswith("postgresql+psycopg://")


def test_shared_server_answers_health(shared_server: ServerProcess) -> None:
    assert httpx.get(shared_server.url + HEALTH_PATH, timeout=5).status_code == 200


def test_server_restarts_on_the_same_port_and_storage(server: ServerProcess) -> None:
    url = server.url
    assert server.stop() is not None
    assert not server.healthy()
    server.start()
    assert server.url == url and server.healthy()
    server.kill()
    server.start()
    assert server.healthy()
