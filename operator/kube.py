"""The few Kubernetes API calls the operator makes itself (kopf does the watching).

The official ``kubernetes`` client, synchronous: kopf runs synchronous handlers in its thread
pool, and the webhook never calls the API on the request path. Objects come back as plain JSON
dicts (``_preload_content=False``), the same shape kopf hands to handlers.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from pluto_operator.model import GROUP, PLURAL, VERSION

JOBSET_GROUP, JOBSET_VERSION, JOBSETS = "jobset.x-k8s.io", "v1alpha2", "jobsets"


def load_api_client() -> Any:
    """In-cluster credentials in a pod, else the kubeconfig (``KUBECONFIG`` or ~/.kube)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def _json(response: Any) -> Any:
    return json.loads(response.data)


class Kube:
    def __init__(self, api_client: Any) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.admission = client.AdmissionregistrationV1Api(api_client)

    def server_version(self) -> tuple[int, int]:
        """(major, minor) of the API server; ``minor`` may carry a ``+`` on managed clusters."""
        info = client.VersionApi(self.api).get_code()
        digits = [int(re.sub(r"\D", "", part) or 0) for part in (info.major, info.minor)]
        return digits[0], digits[1]

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        response = self.core.list_namespaced_pod(
            namespace, label_selector=label_selector, _preload_content=False)
        return list(_json(response).get("items") or [])

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(_json(self.batch.read_namespaced_job(
                name, namespace, _preload_content=False)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_jobset(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(_json(self.custom.get_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSETS, name, _preload_content=False)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_plutorun(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a PlutoRun; False when one of that name exists already."""
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def apply_webhook_configuration(self, body: dict[str, Any]) -> None:
        """Create the MutatingWebhookConfiguration, or replace the one of that name."""
        name = body["metadata"]["name"]
        try:
            # A plain dict is sent as is: the typed model would only be serialised back to it.
            self.admission.create_mutating_webhook_configuration(
                body, _preload_content=False)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = _json(self.admission.read_mutating_webhook_configuration(
                name, _preload_content=False))
            body = {**body, "metadata": {**body["metadata"],
                                         "resourceVersion": current["metadata"]["resourceVersion"]}}
            self.admission.replace_mutating_webhook_configuration(
                name, body, _preload_content=False)  # type: ignore[arg-type]

    def delete_webhook_configuration(self, name: str) -> None:
        try:
            self.admission.delete_mutating_webhook_configuration(name, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
