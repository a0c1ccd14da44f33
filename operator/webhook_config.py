"""The MutatingWebhookConfiguration that sends pod CREATEs to the webhook.

The Helm chart renders the in-cluster one (a Service client config); ``pluto operator --dev``
applies this one (a URL client config) and removes it on exit. Both carry the same rules and
selectors, which tests/test_chart.py compares, so the two modes cover the same pods.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from pluto_operator.names import INJECT_DISABLED, LABEL_COMPONENT, LABEL_INJECT
from pluto_operator.servers import WEBHOOK_PATH
from pluto_operator.settings import FailurePolicy

WEBHOOK_NAME = "pods.pluto.dev"
#: Namespaces whose pods are never sent to the webhook: the cluster's own.
SYSTEM_NAMESPACES = ("kube-system", "kube-node-lease", "kube-public")
#: The API server waits at most this long for an answer (the issue's bound is 10 s).
TIMEOUT_SECONDS = 5


def rules() -> list[dict[str, Any]]:
    return [{
        "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
        "operations": ["CREATE"], "scope": "Namespaced",
    }]


def namespace_selector(namespaces: Sequence[str] = ()) -> dict[str, Any]:
    """The cluster's own namespaces never; with ``namespaces`` (``--namespace``, the chart's
    ``namespaces``), only those: elsewhere no reconciler opens or finishes the runs."""
    expressions: list[dict[str, Any]] = [{
        "key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": list(SYSTEM_NAMESPACES),
    }]
    if namespaces:
        expressions.append({"key": "kubernetes.io/metadata.name", "operator": "In",
                            "values": list(namespaces)})
    return {"matchExpressions": expressions}


def object_selector() -> dict[str, Any]:
    return {"matchExpressions": [
        # The operator's own pods: it must never wait on itself to start.
        {"key": LABEL_COMPONENT, "operator": "DoesNotExist"},
        {"key": LABEL_INJECT, "operator": "NotIn", "values": [INJECT_DISABLED]},
    ]}


def dev_configuration(name: str, url: str, ca_pem: bytes,
                      failure_policy: FailurePolicy,
                      namespaces: Sequence[str] = ()) -> dict[str, Any]:
    """The configuration for ``--dev``: the API server calls ``url`` directly."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "pluto-operator"}},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": {
                "url": url.rstrip("/") + WEBHOOK_PATH,
                "caBundle": base64.b64encode(ca_pem).decode("ascii"),
            },
            "rules": rules(),
            "failurePolicy": failure_policy,
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": TIMEOUT_SECONDS,
            "reinvocationPolicy": "IfNeeded",
            "matchPolicy": "Equivalent",
            "namespaceSelector": namespace_selector(namespaces),
            "objectSelector": object_selector(),
        }],
    }
