"""The sidecar's own Prometheus metrics, served on ``/metrics`` by :mod:`pluto_sidecar.health`.

They live in a private :class:`~prometheus_client.CollectorRegistry`, not the process-global
one, so that tests can build as many sidecars in one process as they like, and so that nothing
another library registers globally leaks into the sidecar's endpoint.

Counters get prometheus_client's ``_total`` suffix on exposition: ``frames_in`` is exported as
``pluto_sidecar_frames_in_total``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "PREFIX", "Telemetry"]

PREFIX = "pluto_sidecar"


class Telemetry:
    """Counters and gauges that the socket server, spool and forwarder update.

    Counters (``.inc(n)``; labelled ones via ``.labels(...).inc()``):

    ``frames_in`` [kind]
        frames read from clients, by frame kind.
    ``points_in``
        metric points received from clients (acknowledged, i.e. spooled).
    ``batches_sent`` / ``points_sent``
        batches and points the server acknowledged.
    ``bytes_sent`` [encoding]
        bytes of the batches the server acknowledged, as sent (compressed: ``zstd`` or
        ``gzip``, see ``pluto_sidecar.compression``).
    ``retries``
        forwarder send attempts that failed and will be retried.
    ``dead_letters``
        batches moved to the dead-letter file after a permanent rejection.
    ``client_errors`` [reason]
        clients answered with an error (malformed frame, oversized, bad version, ...).
    ``api_requests`` [status]
        requests on the API socket (``pluto_sidecar.proxy``), by answer class (``2xx``,
        ``4xx``, ``5xx``; ``broken``: cut off mid-way by the server or the client).
    ``api_request_bytes`` / ``api_response_bytes``
        body bytes proxied to the server (uploads) and back to clients (downloads).

    Gauges (``.set(x)``, or ``.set_function(f)`` to compute on scrape):

    ``spool_bytes``, ``spool_volume_full`` (1 while the spool's volume has no room and clients
    are held back), ``oldest_unsent_age_seconds``, ``connected_clients``, ``runs_pending``
    (runs created/attached locally whose server ids are not known yet), ``api_in_flight``
    (requests being proxied now).

    With ``process_metrics`` (default) the registry also carries the sidecar process's own
    CPU seconds, RSS, open fds, ... as ``pluto_sidecar_process_*`` (Linux only; absent elsewhere).
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self.frames_in = Counter(
            f"{PREFIX}_frames_in", "Frames received from clients.", ["kind"], registry=r
        )
        self.points_in = Counter(
            f"{PREFIX}_points_in", "Metric points received from clients and spooled.", registry=r
        )
        self.batches_sent = Counter(
            f"{PREFIX}_batches_sent", "Batches acknowledged by the server.", registry=r
        )
        self.points_sent = Counter(
            f"{PREFIX}_points_sent", "Metric points acknowledged by the server.", registry=r
        )
        self.bytes_sent = Counter(
            f"{PREFIX}_bytes_sent",
            "Bytes of batches acknowledged by the server, as sent (compressed).", ["encoding"],
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_retries", "Failed send attempts that will be retried.", registry=r
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters",
            "Batches the server rejected permanently, moved to the dead-letter file.",
            registry=r,
        )
        self.client_errors = Counter(
            f"{PREFIX}_client_errors", "Errors answered to clients.", ["reason"], registry=r
        )

        self.api_requests = Counter(
            f"{PREFIX}_api_requests",
            "Requests proxied on the API socket, by answer class (broken: cut off).",
            ["status"], registry=r,
        )
        self.api_request_bytes = Counter(
            f"{PREFIX}_api_request_bytes",
            "Request body bytes proxied from clients to the server.", registry=r,
        )
        self.api_response_bytes = Counter(
            f"{PREFIX}_api_response_bytes",
            "Response body bytes proxied from the server to clients.", registry=r,
        )

        self.spool_bytes = Gauge(
            f"{PREFIX}_spool_bytes", "Bytes in the spool not yet acknowledged.", registry=r
        )
        self.spool_volume_full = Gauge(
            f"{PREFIX}_spool_volume_full",
            "1 while the spool's volume is full: clients are held back, nothing is dropped.",
            registry=r,
        )
        self.oldest_unsent_age_seconds = Gauge(
            f"{PREFIX}_oldest_unsent_age_seconds",
            "Age of the oldest spooled record the server has not acknowledged (0 when none).",
            registry=r,
        )
        self.connected_clients = Gauge(
            f"{PREFIX}_connected_clients", "Clients connected to the socket.", registry=r
        )
        self.runs_pending = Gauge(
            f"{PREFIX}_runs_pending",
            "Runs created or attached locally that the server has not confirmed yet.",
            registry=r,
        )

        self.api_in_flight = Gauge(
            f"{PREFIX}_api_in_flight", "Requests being proxied on the API socket.", registry=r
        )

        if process_metrics:
            ProcessCollector(namespace=PREFIX, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (content type ``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)
