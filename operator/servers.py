"""The operator's two HTTP listeners (aiohttp, which kopf already runs on).

- the webhook: HTTPS, ``POST /mutate-pods``, AdmissionReview v1 (``admission.review``);
- health: plain HTTP, ``/healthz`` (the process answers) and ``/readyz`` (the webhook
  listens and the caches are warm, or for the reconciler role, the caches are warm).

Events about pods the webhook could not inject are posted through kopf's event queue, off the
request path, so a slow API server never slows admission down.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from pluto_operator.admission import Mutation, PodRequest, Reviewed, review
from pluto_operator.settings import FailurePolicy

logger = logging.getLogger("pluto.operator.webhook")

WEBHOOK_PATH = "/mutate-pods"
#: Larger pods than this are not a pod spec anyone writes; refusing early bounds memory.
MAX_REVIEW_BYTES = 3 * 1024 * 1024


class WebhookListener:
    """The HTTPS admission endpoint."""

    def __init__(
        self,
        mutate: Callable[[PodRequest], Mutation],
        *,
        failure_policy: FailurePolicy,
        on_reviewed: Callable[[Reviewed], None] | None = None,
    ) -> None:
        self.mutate = mutate
        self.failure_policy = failure_policy
        self.on_reviewed = on_reviewed
        self.listening = False
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await request.read()
        reviewed = review(body, self.mutate, self.failure_policy)
        if self.on_reviewed is not None:
            try:
                self.on_reviewed(reviewed)
            except Exception:  # reporting must never turn an answer into a 500
                logger.exception("reporting an admission outcome failed")
        logger.debug("admission %s in %.2f ms", reviewed.outcome,
                     (time.perf_counter() - started) * 1000)
        return web.Response(body=reviewed.body, content_type="application/json")

    async def start(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(WEBHOOK_PATH, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=context)
        await site.start()
        self.port = _bound_port(self._runner, port)
        self.listening = True
        scheme = "https" if context is not None else "http"
        logger.info("webhook listening on %s://%s:%s%s", scheme, host, self.port, WEBHOOK_PATH)

    async def stop(self) -> None:
        self.listening = False
        if self._runner is not None:
            await self._runner.cleanup()


class HealthListener:
    """``/healthz`` and ``/readyz`` on plain HTTP for the kubelet's probes."""

    def __init__(self, ready: Callable[[], tuple[bool, str]]) -> None:
        self.ready = ready
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, detail = self.ready()
        return web.json_response({"ready": ok, "detail": detail}, status=200 if ok else 503)

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = _bound_port(self._runner, port)
        logger.info("health endpoints on http://%s:%s/healthz and /readyz", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    """The port actually bound (``asked`` may be 0: any free port, as the tests use)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked
