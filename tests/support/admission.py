"""AdmissionReview v1 requests as the API server sends them, and applying the answers."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from typing import Any

import jsonpatch


def pod_review(pod: dict[str, Any], namespace: str = "ml", *, operation: str = "CREATE",
               dry_run: bool = False, uid: str | None = None) -> dict[str, Any]:
    """The review the API server posts for a pod CREATE in ``namespace``."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            # Controllers create pods with generateName: the name is not known yet.
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:job-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    response = answer["response"]
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def apply_answer(pod: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it after this answer (the JSON patch applied)."""
    ops = patch_of(answer)
    if not ops:
        return copy.deepcopy(pod)
    result: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
    return result
