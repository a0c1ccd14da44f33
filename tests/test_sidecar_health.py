"""The sidecar's observability: health/readiness/metrics over HTTP, its Prometheus metrics,
and its structured logs (one JSON object per line, no secrets)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from pluto_sidecar.health import HealthServer
from pluto_sidecar.logs import (
    COVERED_LOGGERS,
    LOGGER_NAME,
    configure,
    log_event,
    redact,
    scrub,
)
from pluto_sidecar.telemetry import Telemetry


class Readiness:
    """A readiness callable the test flips."""

    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "")

    def __call__(self) -> tuple[bool, str]:
        return self.state


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def health(telemetry: Telemetry, readiness: Readiness) -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, telemetry, readiness)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(health: HealthServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=health.url, timeout=5.0) as c:
        yield c


# -- HealthServer --------------------------------------------------------------------


def test_port_zero_binds_a_free_port(health: HealthServer) -> None:
    assert health.port > 0
    assert health.url == f"http://127.0.0.1:{health.port}"


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


def test_readyz_follows_the_callable(client: httpx.Client, readiness: Readiness) -> None:
    response = client.get("/readyz")
    assert (response.status_code, response.text) == (200, "ready")

    readiness.state = (False, "spool directory is not writable")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.text == "spool directory is not writable"

    readiness.state = (True, "")
    assert client.get("/readyz").status_code == 200


def test_readyz_when_the_callable_raises(telemetry: Telemetry) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("socket gone")

    with HealthServer("127.0.0.1", 0, telemetry, broken) as server:
        response = httpx.get(f"{server.url}/readyz", timeout=5.0)
        assert response.status_code == 503
        assert "socket gone" in response.text
        assert httpx.get(f"{server.url}/healthz", timeout=5.0).status_code == 200


def test_metrics_exposes_telemetry(client: httpx.Client, telemetry: Telemetry) -> None:
    telemetry.frames_in.labels(kind="chunk").inc(3)
    telemetry.client_errors.labels(reason="bad_header").inc()
    telemetry.spool_bytes.set(4096)

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert 'pluto_sidecar_frames_in_total{kind="chunk"} 3.0' in response.text
    assert 'pluto_sidecar_client_errors_total{reason="bad_header"} 1.0' in response.text
    assert "pluto_sidecar_spool_bytes 4096.0" in response.text


def test_query_strings_are_ignored(client: httpx.Client) -> None:
    assert client.get("/healthz?probe=kubelet").status_code == 200


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/extra", "/metrics.txt"])
def test_other_paths_are_404(client: httpx.Client, path: str) -> None:
    assert client.get(path).status_code == 404


def test_head_has_no_body(client: httpx.Client) -> None:
    response = client.head("/healthz")
    assert response.status_code == 200
    assert response.content == b""


def test_requests_are_not_logged(client: httpx.Client, capfd: pytest.CaptureFixture[str]) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/nope"):
        client.get(path)
    assert capfd.readouterr().err == ""


def test_serves_concurrent_requests(health: HealthServer) -> None:
    statuses: list[int] = []

    def probe() -> None:
        with httpx.Client(base_url=health.url, timeout=5.0) as c:
            statuses.extend(c.get("/metrics").status_code for _ in range(5))

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert statuses == [200] * 40


def test_stop_frees_the_port(telemetry: Telemetry, readiness: Readiness) -> None:
    server = HealthServer("127.0.0.1", 0, telemetry, readiness)
    server.start()
    port = server.port
    assert httpx.get(f"{server.url}/healthz", timeout=5.0).status_code == 200
    server.stop()
    server.stop()  # idempotent

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0)
    # A restarted sidecar can bind the same port at once.
    again = HealthServer("127.0.0.1", port, telemetry, readiness)
    again.start()
    try:
        assert again.port == port
        assert httpx.get(f"{again.url}/healthz", timeout=5.0).text == "ok"
    finally:
        again.stop()


def test_a_busy_port_fails_start(telemetry: Telemetry, readiness: Readiness) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            HealthServer("127.0.0.1", port, telemetry, readiness).start()


def test_stop_without_start_is_harmless(telemetry: Telemetry, readiness: Readiness) -> None:
    HealthServer("127.0.0.1", 0, telemetry, readiness).stop()


# -- Telemetry -----------------------------------------------------------------------


def test_telemetry_registries_are_independent() -> None:
    a, b = Telemetry(), Telemetry()  # the global registry would refuse a second one
    a.points_in.inc(10)
    assert b"pluto_sidecar_points_in_total 0.0" in b.render()
    assert b"pluto_sidecar_points_in_total 10.0" in a.render()


def test_telemetry_names() -> None:
    families = {f.name: f for f in text_string_to_metric_families(Telemetry().render().decode())}
    counters = {
        "frames_in", "points_in", "batches_sent", "points_sent",
        "retries", "dead_letters", "client_errors",
    }  # fmt: skip
    gauges = {"spool_bytes", "oldest_unsent_age_seconds", "connected_clients", "runs_pending"}
    for name in counters:
        assert families[f"pluto_sidecar_{name}"].type == "counter"
    for name in gauges:
        assert families[f"pluto_sidecar_{name}"].type == "gauge"
    assert all(name.startswith("pluto_sidecar_") for name in families)


# -- structured logs -----------------------------------------------------------------


@pytest.fixture
def sidecar_logging() -> Iterator[None]:
    """Restore the loggers ``configure`` sets up (``pluto.sidecar`` and the others it covers,
    the root logger, Python warnings) after a test reconfigures them."""
    loggers = [logging.getLogger(name) for name in (LOGGER_NAME, *COVERED_LOGGERS)]
    loggers.append(logging.getLogger())
    saved = [(logger, list(logger.handlers), logger.level, logger.propagate)
             for logger in loggers]
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_one_json_object_per_line(
    sidecar_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info")
    log = logging.getLogger("pluto.sidecar.spool")
    log_event(log, "spool recovered", records=3, torn_bytes=0)
    log.info("listening on %s", "/var/run/pluto/pluto.sock")
    log.info("multi\nline event", extra={"fields": {"path": "a\nb"}})
    log.debug("not at info")

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 3
    first, second, third = _json_lines(err)
    assert first["event"] == "spool recovered"
    assert first["level"] == "info"
    assert first["logger"] == "pluto.sidecar.spool"
    assert (first["records"], first["torn_bytes"]) == (3, 0)
    assert str(first["ts"]).endswith("Z") and "T" in str(first["ts"])
    assert list(first)[:4] == ["ts", "level", "logger", "event"]
    assert second["event"] == "listening on /var/run/pluto/pluto.sock"
    assert (third["event"], third["path"]) == ("multi\nline event", "a\nb")


def test_secret_fields_are_redacted(
    sidecar_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    log = logging.getLogger("pluto.sidecar.upstream")
    log_event(
        log,
        "connecting",
        api_key="pk_live_123",
        Authorization_Token="abc",
        db_password="hunter2",
        client_secret="s3",
        headers={"X-API-Key": "pk_live_123", "accept": "msgpack"},
        url="https://user:hunter2@pluto.example/api",
        note="sent Bearer pk_live_123 and token=pk_live_123",
        run="MMP-42",
    )
    err = capsys.readouterr().err
    assert "pk_live_123" not in err and "hunter2" not in err
    (entry,) = _json_lines(err)
    for name in ("api_key", "Authorization_Token", "db_password", "client_secret"):
        assert entry[name] == "[redacted]"
    assert entry["headers"] == {"X-API-Key": "[redacted]", "accept": "msgpack"}
    assert entry["url"] == "https://user:[redacted]@pluto.example/api"
    assert entry["run"] == "MMP-42"


def test_exceptions_become_an_error_field(
    sidecar_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    log = logging.getLogger("pluto.sidecar.forwarder")
    try:
        raise ConnectionError("server refused: api_key=pk_live_123")
    except ConnectionError:
        log_event(log, "send failed", level=logging.WARNING, exc_info=True, attempt=4)
        log.exception("plain exception call")
    log_event(log, "no exception, a plain error field", error="timed out")

    err = capsys.readouterr().err
    assert "pk_live_123" not in err
    warned, logged, plain = _json_lines(err)
    assert warned["level"] == "warning"
    assert warned["attempt"] == 4
    assert warned["error"] == "ConnectionError: server refused: api_key=[redacted]"
    assert "Traceback" in str(warned["traceback"])
    assert logged["level"] == "error"
    assert str(logged["error"]).startswith("ConnectionError")
    assert plain["error"] == "timed out"


def test_configure_is_idempotent_and_validates(
    sidecar_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("DEBUG")
    configure("debug")
    logging.getLogger("pluto.sidecar").debug("once")
    assert len(capsys.readouterr().err.splitlines()) == 1
    with pytest.raises(ValueError, match="unknown log level"):
        configure("chatty")


def test_redact_and_scrub_helpers() -> None:
    assert redact({"token": 1, "n": {"secret_key": "x"}, "ok": ["Bearer abc"]}) == {
        "token": "[redacted]",
        "n": {"secret_key": "[redacted]"},
        "ok": ["Bearer [redacted]"],
    }
    assert scrub('{"password": "pw1"}') == '{"password": "[redacted]"}'
    assert scrub("nothing to hide, step=3") == "nothing to hide, step=3"


def test_stderr_of_a_real_process() -> None:
    """What an operator sees with `kubectl logs`: JSON lines on stderr, nothing on stdout."""
    code = (
        "import logging\n"
        "from pluto_sidecar.logs import configure, log_event\n"
        "configure()\n"
        "log = logging.getLogger('pluto.sidecar')\n"
        "log_event(log, 'sidecar ready', socket='/tmp/x.sock', api_token='t0ps3cret')\n"
        "log_event(log, 'sidecar stopped', delivered=10)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == ""
    assert "t0ps3cret" not in result.stderr
    ready, stopped = _json_lines(result.stderr)
    assert ready["event"] == "sidecar ready" and ready["api_token"] == "[redacted]"
    assert stopped["delivered"] == 10


def test_what_the_sdk_modules_log_in_the_sidecar_is_json_too() -> None:
    """The sidecar runs SDK code (``pluto.spool``) whose logger is outside the
    ``pluto.sidecar`` tree, and Python warnings and asyncio's errors reach the root logger:
    they used to print as plain text among the JSON lines."""
    code = (
        "import logging, warnings\n"
        "from pluto_sidecar.logs import configure\n"
        "configure()\n"
        "logging.getLogger('pluto.spool').warning('pluto: cannot save the spool cursor of %s',"
        " '/spool')\n"
        "logging.getLogger('pluto').info('from the SDK')\n"
        "warnings.warn('pluto: cannot write to the spool', RuntimeWarning)\n"
        "logging.getLogger('asyncio').error('Task exception was never retrieved')\n"
        "logging.getLogger('httpx').info('HTTP Request: POST ... 200 OK')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == ""
    lines = _json_lines(result.stderr)  # raises on a line that is not JSON
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("pluto.spool", "warning"),
        ("pluto", "info"),
        ("py.warnings", "warning"),
        ("asyncio", "error"),
    ]
    assert lines[0]["event"] == "pluto: cannot save the spool cursor of /spool"
    assert "cannot write to the spool" in str(lines[2]["event"])


def test_configure_covers_the_sdk_loggers_in_process(
    sidecar_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info")
    logging.getLogger("pluto.spool").warning("pluto: the spool %s has room again", "/s")
    logging.getLogger("pluto.sidecar.spool").info("spooled")
    (spool, own) = _json_lines(capsys.readouterr().err)  # each printed once
    assert (spool["logger"], spool["event"]) == ("pluto.spool",
                                                  "pluto: the spool /s has room again")
    assert own["logger"] == "pluto.sidecar.spool"
