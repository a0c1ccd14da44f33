"""``pluto operator``: assemble kopf's registry for the chosen role and run it.

One process can play both roles (``--role all``, the default and what ``--dev`` uses); the chart
runs them as two Deployments: one reconciler (acting on objects must happen once) and two or
more webhook replicas (admission must stay up through a node drain). Both keep the same warm
caches, as kopf indices, so a webhook replica answers from memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import kopf

from pluto._gc import freeze_start_up_objects
from pluto_operator.admission import Reviewed
from pluto_operator.cache import IndexedView, index_namespaces, index_plutoruns
from pluto_operator.certs import ReloadingContext, self_signed, write_certificate
from pluto_operator.injection import Placement
from pluto_operator.kube import Kube, load_api_client
from pluto_operator.model import GROUP, PLURAL, VERSION
from pluto_operator.names import FINALIZER
from pluto_operator.reconciler import Reconciler, register
from pluto_operator.servers import HealthListener, WebhookListener
from pluto_operator.settings import OperatorSettings
from pluto_operator.tracking import TrackingServers
from pluto_operator.webhook import PodInjector
from pluto_operator.webhook_config import dev_configuration

logger = logging.getLogger("pluto.operator")

#: Native sidecars (init containers with restartPolicy Always) are on by default from 1.29.
NATIVE_SIDECARS_SINCE = (1, 29)


class Operator:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.kube = Kube(load_api_client())
        self.servers = TrackingServers(settings.api_key)
        self.view: IndexedView | None = None
        self.webhook: WebhookListener | None = None
        self.health = HealthListener(self.readiness)
        self.placement: Placement = "native"
        self._tls: ReloadingContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._context: contextvars.Context | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- assembly --------------------------------------------------------------------------

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        kopf.on.login(registry=registry)(kopf.login_via_client)
        kopf.index(GROUP, VERSION, PLURAL, id="index_plutoruns", registry=registry)(
            index_plutoruns)
        kopf.index("namespaces", id="index_namespaces", registry=registry)(index_namespaces)
        # kopf holds resource handlers until every index has its first listing: this one
        # running is the sign that the caches are warm.
        kopf.on.event("namespaces", id="caches_warm", registry=registry)(self._caches_warm)
        kopf.on.startup(id="start", registry=registry)(self._startup)
        kopf.on.cleanup(id="stop", registry=registry)(self._cleanup)
        if self.settings.runs_reconciler:
            register(registry, Reconciler(self.settings, self.kube, self.servers))
        return registry

    def run(self) -> None:
        namespaces = list(self.settings.namespaces)
        kopf.run(
            registry=self.registry(),
            standalone=True,  # no peering: the chart runs one reconciler replica
            clusterwide=not namespaces,
            namespaces=namespaces,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def _startup(self, settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.posting.reporting_component = "pluto-operator"
        # kopf turns its own log lines into events at this level; ours are posted explicitly.
        settings.posting.level = logging.WARNING
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="pluto.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="pluto.dev", key="last-handled-configuration")
        self._context = contextvars.copy_context()
        # kopf hands every handler its indices by id; they are live and fill as kopf lists.
        self.view = IndexedView(kwargs["index_plutoruns"], kwargs["index_namespaces"])
        await self.health.start(self.settings.health_host, self.settings.health_port)
        if self.settings.runs_webhook:
            self.placement = await self._placement()
            await self._start_webhook()

    async def _placement(self) -> Placement:
        mode = self.settings.sidecar_mode
        if mode != "auto":
            return mode
        try:
            version = await asyncio.to_thread(self.kube.server_version)
        except Exception as exc:
            logger.warning("cannot read the API server's version (%s); injecting native "
                           "sidecars: set --sidecar-mode classic for clusters before 1.29", exc)
            return "native"
        placement: Placement = "native" if version >= NATIVE_SIDECARS_SINCE else "classic"
        logger.info("Kubernetes %d.%d: %s sidecars", *version, placement)
        return placement

    async def _start_webhook(self) -> None:
        s = self.settings
        assert self.view is not None
        port = s.webhook_port
        ca_pem: bytes | None = None
        if s.dev:
            if not s.webhook_url:
                raise kopf.PermanentError("--dev needs --webhook-url https://HOST:PORT")
            url = urllib.parse.urlsplit(s.webhook_url)
            if url.scheme != "https" or not url.hostname:
                raise kopf.PermanentError(
                    f"--webhook-url {s.webhook_url!r}: the API server calls webhooks over "
                    "HTTPS only: give https://HOST:PORT")
            port = url.port or 443
            cert = self_signed([url.hostname, "localhost", "127.0.0.1"])
            ca_pem = cert.ca_pem
            self._tmp = tempfile.TemporaryDirectory(prefix="pluto-webhook-")
            cert_file, key_file = write_certificate(cert, Path(self._tmp.name))
            self._tls = ReloadingContext(cert_file, key_file)
        elif s.tls_cert_file and s.tls_key_file:
            self._tls = ReloadingContext(s.tls_cert_file, s.tls_key_file)
            self._tasks.append(asyncio.create_task(self._tls.watch()))
        else:
            raise kopf.PermanentError(
                "the webhook needs --tls-cert-file and --tls-key-file (the chart mounts them), "
                "or --dev --webhook-url https://HOST:PORT to generate a certificate")
        injector = PodInjector(s, self.view, self.placement)
        self.webhook = WebhookListener(injector, failure_policy=s.failure_policy,
                                       on_reviewed=self._report)
        await self.webhook.start(s.webhook_host, port, self._tls.context)
        if ca_pem is not None:
            body = dev_configuration(s.webhook_config_name, s.webhook_url or "", ca_pem,
                                     s.failure_policy, s.namespaces)
            await asyncio.to_thread(self.kube.apply_webhook_configuration, body)
            logger.info("MutatingWebhookConfiguration %s points at %s", s.webhook_config_name,
                        s.webhook_url)

    async def _cleanup(self, **_: Any) -> None:
        for task in self._tasks:
            task.cancel()
        if self.settings.dev and self.webhook is not None:
            try:
                await asyncio.to_thread(self.kube.delete_webhook_configuration,
                                        self.settings.webhook_config_name)
            except Exception as exc:  # the cluster may be gone: say so and go on exiting
                logger.warning("could not remove MutatingWebhookConfiguration %s: %s",
                               self.settings.webhook_config_name, exc)
        if self.webhook is not None:
            await self.webhook.stop()
        await self.health.stop()
        self.servers.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def _caches_warm(self, **_: Any) -> None:
        # kopf sets its event queue only in the tasks that handle objects, not for startup
        # handlers: kopf.warn from the context copied at startup raised LookupError, so the
        # webhook's events were never posted (found by tests/test_rbac.py). Handlers run in
        # (a copy of) such a task's context: keep that one for _report.
        # Async, so on the loop: kopf runs a sync handler in a worker thread, once per
        # namespace and concurrently, and the check below would not be once (nor would an
        # asyncio.Event be set from its own loop).
        self._context = contextvars.copy_context()
        if self.view is not None and not self.view.warm.is_set():
            # Before ready, so that its own collection is not in the way of admissions.
            frozen = freeze_start_up_objects()
            logger.info("start-up objects frozen out of the garbage collector's walks: %d",
                        frozen)
            self.view.mark_warm()

    def readiness(self) -> tuple[bool, str]:
        if self.view is None or not self.view.warm.is_set():
            return False, "caches are not filled yet"
        if self.settings.runs_webhook and (self.webhook is None or not self.webhook.listening):
            return False, "the webhook is not listening yet"
        return True, "ready"

    # -- reporting -------------------------------------------------------------------------

    def _report(self, reviewed: Reviewed) -> None:
        request = reviewed.request
        if reviewed.outcome == "malformed":
            logger.warning("malformed admission review: %s", "; ".join(reviewed.warnings))
            return
        if request is None or request.dry_run:
            return
        if reviewed.outcome != "error" and not reviewed.warnings:
            return
        for line in reviewed.warnings:
            logger.warning("%s (namespace %s)", line, request.namespace)
        owners = (request.pod.get("metadata") or {}).get("ownerReferences") or []
        if not owners or self._context is None:
            return  # a bare pod has no name or uid yet to hang an event on
        owner = owners[0]
        target = kopf.Body({
            "apiVersion": owner.get("apiVersion"), "kind": owner.get("kind"),
            "metadata": {"name": owner.get("name"), "namespace": request.namespace,
                         "uid": owner.get("uid")},
        })
        reason = "SidecarNotInjected" if reviewed.outcome == "error" else "PlutoInjection"
        message = "; ".join(reviewed.warnings) or str(reviewed.error)
        # kopf's event queue lives in its context variables: post from that context.
        self._context.run(kopf.warn, target, reason=reason, message=message)


def run(settings: OperatorSettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Operator(settings).run()
    return 0
