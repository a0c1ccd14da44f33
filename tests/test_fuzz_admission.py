"""Hypothesis-generated AdmissionReviews POSTed to the webhook over real HTTPS.

The listener is the operator's own (``WebhookListener`` with the real ``PodInjector``), on
an event loop thread with a generated certificate, as in ``tests/test_webhook_https.py``.
Reviews are random JSON, and well-formed pod reviews with any part replaced by a value of
another type (request, kind, object, metadata, labels, spec, containers, volumes ...).

What holds, for every body: HTTP 200 and a well-formed AdmissionReview v1 response carrying
the request's uid when it had a readable one; under the default failure policy the pod is
allowed (with a warning when something was wrong), under ``--failure-policy Fail`` a review
the webhook could not read is denied with the reason, never a 500. Found: a pod whose
``metadata`` was not an object raised AttributeError, answered with a 500.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.admission import pod_review
from support.webhook_https import Webhook, WebhookServers

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(params=["Ignore", "Fail"])
def hook(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Webhook]:
    servers = WebhookServers(tmp_path)
    yield servers.start(failure_policy=request.param, timeout=10)
    servers.close()


# -- reviews ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def good_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "sft-", "labels": {"pluto.dev/run": "sft"},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": "sft", "uid": "u"}]},
            "spec": {"containers": [{"name": "c", "image": "i", "command": ["x"],
                                     "env": [{"name": "A", "value": "1"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]}}


#: Where a value may be replaced: paths into a well-formed pod review.
PATHS: list[tuple[str | int, ...]] = [
    (), ("apiVersion",), ("kind",), ("request",), ("request", "uid"), ("request", "kind"),
    ("request", "kind", "kind"), ("request", "kind", "group"), ("request", "operation"),
    ("request", "namespace"), ("request", "dryRun"), ("request", "subResource"),
    ("request", "object"), ("request", "object", "metadata"),
    ("request", "object", "metadata", "labels"),
    ("request", "object", "metadata", "labels", "pluto.dev/run"),
    ("request", "object", "metadata", "annotations"),
    ("request", "object", "metadata", "namespace"),
    ("request", "object", "metadata", "ownerReferences"),
    ("request", "object", "metadata", "ownerReferences", 0),
    ("request", "object", "spec"), ("request", "object", "spec", "containers"),
    ("request", "object", "spec", "containers", 0),
    ("request", "object", "spec", "containers", 0, "env"),
    ("request", "object", "spec", "containers", 0, "env", 0),
    ("request", "object", "spec", "containers", 0, "command"),
    ("request", "object", "spec", "containers", 0, "volumeMounts"),
    ("request", "object", "spec", "volumes"), ("request", "object", "spec", "volumes", 0),
    ("request", "object", "spec", "initContainers"),
    ("request", "object", "spec", "serviceAccountName"),
]


@st.composite
def broken_reviews(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(a body, the uid the answer must carry or None when it may have none)."""
    review = pod_review(good_pod(), "ml", uid=draw(st.uuids()).hex)
    uid = review["request"]["uid"]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        replacement = draw(json_values)
        if not path:
            review = replacement
            continue
        target: Any = review
        for step in path[:-1]:
            try:
                target = target[step]
            except (KeyError, IndexError, TypeError):
                target = None
                break
        if isinstance(target, dict) or (isinstance(target, list) and isinstance(path[-1], int)
                                        and path[-1] < len(target)):
            if draw(st.booleans()) and isinstance(target, dict):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = replacement
    still = (isinstance(review, dict) and isinstance(review.get("request"), dict)
             and review["request"].get("uid") == uid)
    return json.dumps(review).encode(), uid if still else None


bodies = st.one_of(
    st.binary(max_size=200).map(lambda b: (b, None)),
    json_values.map(lambda v: (json.dumps(v).encode(), None)),
    broken_reviews(),
)


def check_answer(response: httpx.Response, uid: str | None, failure_policy: str) -> None:
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    reply = answer["response"]
    assert isinstance(reply["uid"], str) and isinstance(reply["allowed"], bool), reply
    if uid is not None:
        assert reply["uid"] == uid, reply
    for warning in reply.get("warnings", []):
        assert isinstance(warning, str) and len(warning) <= 256
    if reply["allowed"]:
        if "patch" in reply:
            assert reply["patchType"] == "JSONPatch"
            assert isinstance(json.loads(base64.b64decode(reply["patch"])), list)
    else:
        # Only Fail denies, and always says why.
        assert failure_policy == "Fail", reply
        assert reply["status"]["message"].startswith("pluto: "), reply


def test_any_body_gets_a_well_formed_answer_never_a_500(hook: Webhook) -> None:
    policy = hook.listener.failure_policy
    outcomes: set[bool] = set()

    @FUZZ
    @given(body=bodies)
    def check(body: tuple[bytes, str | None]) -> None:
        data, uid = body
        response = hook.post(data)
        check_answer(response, uid, policy)
        outcomes.add(response.json()["response"]["allowed"])

    check()
    assert outcomes == ({True} if policy == "Ignore" else {True, False}), outcomes


@pytest.mark.parametrize("metadata", [[], "ml", 7, ["namespace", "ml"], True])
def test_a_pod_whose_metadata_is_not_an_object_is_answered_not_a_500(
        hook: Webhook, metadata: Any) -> None:
    """The bug the fuzz found: ``metadata`` of another type raised AttributeError (a 500)."""
    review = pod_review(good_pod(), "ml", uid="meta-1")
    review["request"]["object"]["metadata"] = metadata
    del review["request"]["namespace"]  # so the namespace is looked up in the metadata
    response = hook.post(json.dumps(review).encode())
    check_answer(response, "meta-1", hook.listener.failure_policy)
    reply = response.json()["response"]
    if hook.listener.failure_policy == "Fail":
        assert reply["allowed"] is False
        assert "metadata is a" in reply["status"]["message"], reply
    else:
        assert reply["allowed"] is True and "patch" not in reply
        assert "metadata is a" in reply["warnings"][0], reply


def test_a_good_review_is_still_patched(hook: Webhook) -> None:
    """The fuzz's seed, answered as before: the pod gets its sidecar."""
    review = pod_review(copy.deepcopy(good_pod()), "ml", uid="good-1")
    response = hook.post(json.dumps(review).encode())
    check_answer(response, "good-1", hook.listener.failure_policy)
    reply = response.json()["response"]
    assert reply["allowed"] is True and reply["patchType"] == "JSONPatch"
