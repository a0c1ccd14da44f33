"""The operator's webhook listener over real HTTPS, for tests that post AdmissionReviews.

Each listener runs on an event loop thread of its own with a certificate from
``certs.self_signed``; its client verifies that certificate against the generated CA, as the
API server verifies ``caBundle``. By default the listener answers with the real
``PodInjector`` and one PlutoRun (``sft`` in namespace ``ml``, project ``llm``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pluto_operator.admission import Mutation, PodRequest
from pluto_operator.certs import ReloadingContext, self_signed, write_certificate
from pluto_operator.model import PlutoRun
from pluto_operator.servers import WEBHOOK_PATH, WebhookListener
from pluto_operator.settings import FailurePolicy, OperatorSettings
from pluto_operator.targets import KnownRun, NamespaceInfo
from pluto_operator.webhook import PodInjector


class StaticView:
    """The cluster as the injector sees it: a fixed list of PlutoRuns, no namespace labels."""

    def __init__(self, runs: list[KnownRun]) -> None:
        self._runs = runs

    def namespace(self, name: str) -> NamespaceInfo | None:
        return None

    def runs(self, namespace: str) -> list[KnownRun]:
        return [r for r in self._runs if r.namespace == namespace]


def default_injector() -> PodInjector:
    run = PlutoRun.model_validate({"metadata": {"name": "sft", "namespace": "ml"},
                                   "spec": {"project": "llm"}})
    view = StaticView([KnownRun("sft", "ml", "2026-01-01T00:00:00Z", run)])
    return PodInjector(OperatorSettings(), view, "native")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class Webhook:
    def __init__(self, url: str, ca_file: Path, listener: WebhookListener,
                 timeout: float) -> None:
        self.url = url
        self.ca_file = ca_file
        self.listener = listener
        self.client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)),
                                   timeout=timeout)

    def post(self, body: bytes | dict[str, Any]) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(self.url, content=content,
                                headers={"content-type": "application/json"})


class WebhookServers:
    """Starts webhook listeners (files under ``directory``); ``close`` stops them all."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._loop = LoopThread()
        self._started: list[Webhook] = []

    def start(self, mutate: Callable[[PodRequest], Mutation] | None = None,
              failure_policy: FailurePolicy = "Ignore", timeout: float = 5.0) -> Webhook:
        n = len(self._started)
        cert = self_signed(["localhost", "127.0.0.1"])
        cert_file, key_file = write_certificate(cert, self._directory / f"tls{n}")
        ca_file = self._directory / f"ca{n}.pem"
        ca_file.write_bytes(cert.ca_pem)
        listener = WebhookListener(mutate or default_injector(), failure_policy=failure_policy)
        tls = ReloadingContext(cert_file, key_file)
        self._loop.run(listener.start("127.0.0.1", 0, tls.context))
        hook = Webhook(f"https://localhost:{listener.port}{WEBHOOK_PATH}", ca_file, listener,
                       timeout)
        self._started.append(hook)
        return hook

    def close(self) -> None:
        for hook in self._started:
            hook.client.close()
            self._loop.run(hook.listener.stop())
        self._loop.close()
