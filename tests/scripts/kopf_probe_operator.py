"""A tiny kopf operator that proves the emulated API server can host a real one.

Not the product: ``tests/test_kube_emulator.py`` runs it with ``kopf run --standalone
--all-namespaces`` against the emulator. It touches what the pluto operator will need:

* an index of namespaces (kopf lists and watches ``/api/v1/namespaces`` before any handler);
* on PlutoRun creation: ``status.phase`` through the status subresource, an event, and the
  namespaces the index saw (so a test can tell the index was filled);
* an on-delete handler, so kopf puts a finalizer on every PlutoRun and removes it (a JSON patch
  guarded by the resourceVersion) after the handler ran; the handler leaves a marker file in
  ``$PROBE_MARKER_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kopf

FINALIZER = "probe.pluto.dev/cleanup"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER


@kopf.index("namespaces")
def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


@kopf.on.create("pluto.dev", "v1alpha1", "plutoruns")
def created(body: kopf.Body, name: str, patch: kopf.Patch, **kwargs: Any) -> None:
    index: kopf.Index[str, dict[str, str]] = kwargs["namespace_labels"]  # kopf passes indices
    patch.status["phase"] = "Pending"
    patch.status["namespacesSeen"] = sorted(index)
    kopf.info(body, reason="ProbeCreated", message=f"the probe saw {name}")


@kopf.on.delete("pluto.dev", "v1alpha1", "plutoruns")
def deleted(name: str, namespace: str | None, **_: Any) -> None:
    marker = Path(os.environ["PROBE_MARKER_DIR"]) / f"deleted-{namespace}-{name}"
    marker.write_text("the on-delete handler ran\n")
