"""Liveness, readiness and metrics over plain HTTP, for kubelet probes and Prometheus.

A stdlib :class:`~http.server.ThreadingHTTPServer` on its own daemon thread, deliberately
independent of the sidecar's asyncio loop: if the loop wedges, ``/healthz`` still answers and
``/readyz`` reports what the readiness callable sees (the callable is run on the request
thread, so it must be thread-safe and quick; a callable that raises reads as not ready).

Routes (``GET``; ``HEAD`` answers the same without a body):

``/healthz``  200 ``ok``, as long as the process serves HTTP.
``/readyz``   200 ``ready``, or 503 with the reason string that ``ready()`` returned.
``/metrics``  200, the :class:`~pluto_sidecar.telemetry.Telemetry` registry in Prometheus text.
anything else 404.

The server binds where told; the sidecar passes ``127.0.0.1`` by default (kubelet probes of a
pod's containers go to the pod IP, so exposing probes means binding ``0.0.0.0`` explicitly).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from pluto_sidecar.telemetry import Telemetry

__all__ = ["HealthServer"]

log = logging.getLogger("pluto.sidecar.health")

_TEXT = "text/plain; charset=utf-8"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    health: HealthServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind() adds socket.getfqdn(host): a reverse DNS lookup that can
        # hang for seconds in a pod with slow cluster DNS. Nothing here needs the name, so
        # only TCPServer's part runs (which also sets SO_REUSEADDR: a restarted sidecar must
        # not wait out TIME_WAIT connections of its predecessor on the same port).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "pluto-sidecar"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, *, body: bool) -> None:
        health = self.server.health
        path = urlsplit(self.path).path
        if path == "/healthz":
            status, ctype, payload = 200, _TEXT, b"ok"
        elif path == "/readyz":
            ready, reason = health.check_ready()
            if ready:
                status, ctype, payload = 200, _TEXT, b"ready"
            else:
                status, ctype, payload = 503, _TEXT, reason.encode("utf-8", "replace")
        elif path == "/metrics":
            status, ctype, payload = 200, CONTENT_TYPE_LATEST, health.telemetry.render()
        else:
            status, ctype, payload = 404, _TEXT, b"not found: try /healthz, /readyz or /metrics"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: probes hit these routes every few seconds; no access log on stderr."""


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics``; see the module docstring.

    ``port`` is the requested port until :meth:`start` binds, then the bound one (so ``0``
    picks a free port and ``port`` tells which). ``start()`` raises ``OSError`` when the
    address cannot be bound; ``stop()`` closes the listening socket and is idempotent.
    """

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry,
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        self.host = host
        self.port = port
        self.telemetry = telemetry
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound server (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def check_ready(self) -> tuple[bool, str]:
        """``ready()``, with an exception turned into not-ready and its text as the reason."""
        try:
            ready, reason = self._ready()
        except Exception as exc:
            log.debug("readiness check raised", exc_info=True)
            return False, f"readiness check failed: {type(exc).__name__}: {exc}"
        return bool(ready), reason if not ready else ""

    def start(self) -> None:
        """Bind and serve on a daemon thread. Calling it twice is an error."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        cls = _Server6 if ":" in self.host else _Server
        server = cls((self.host, self.port), _Handler)
        server.health = self
        self._server = server
        self.port = server.server_port
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() can wait
            name=f"pluto-sidecar-health:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the listening socket (the port is free afterwards)."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever() has left its loop
        server.server_close()
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
