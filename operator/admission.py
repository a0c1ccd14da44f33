"""AdmissionReview v1 in, AdmissionReview v1 out: the protocol side of the pod webhook.

Whatever arrives, the answer is a well-formed review with HTTP 200: a malformed request gets
``allowed: true`` and a warning (``allowed: false`` under ``--failure-policy Fail``), never a
500, because the API server turns a webhook error into a failed pod creation
(``failurePolicy: Fail``) or a slow one (retries until the timeout). An internal error while
deciding is answered the same way, fail-open, unless the operator runs with
``--failure-policy Fail``: then the pod is refused with the reason.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pluto_operator.settings import FailurePolicy

logger = logging.getLogger("pluto.operator.webhook")

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"


@dataclass
class Mutation:
    """What the injection decided for one pod."""

    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PodRequest:
    """The parts of an admission request the injection needs."""

    uid: str
    namespace: str
    pod: Mapping[str, Any]
    dry_run: bool


@dataclass
class Reviewed:
    """The encoded answer, and what happened, for logs, events and metrics."""

    body: bytes
    outcome: str  # "patched", "unchanged", "skipped", "malformed", "error"
    request: PodRequest | None = None
    error: BaseException | None = None
    warnings: list[str] = field(default_factory=list)


class MalformedReview(ValueError):
    """The request is not an AdmissionReview v1 for a pod; says what is wrong.

    ``uid`` is the request's uid when it could be read (the answer then carries it)."""

    def __init__(self, message: str, uid: str = "") -> None:
        super().__init__(message)
        self.uid = uid


_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _answer(uid: str, *, allowed: bool = True, patch: list[dict[str, Any]] | None = None,
            warnings: list[str] | None = None, message: str | None = None) -> bytes:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(_encoder.encode(patch)).decode("ascii")
    if warnings:
        # The API server caps a warning at 256 characters and drops longer ones' tails.
        response["warnings"] = [w[:256] for w in warnings]
    if message is not None:
        response["status"] = {"code": 500, "message": message}
    return _encoder.encode({"apiVersion": API_VERSION, "kind": KIND, "response": response})


def parse(body: bytes) -> tuple[str, PodRequest | None]:
    """The request's uid and, for a pod CREATE, the pod; raises ``MalformedReview``.

    Returns ``(uid, None)`` for a well-formed review of anything else (the webhook
    configuration should not send those, but a hand-written one might).
    """
    try:
        review = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedReview(f"the body is not JSON: {exc}") from exc
    if not isinstance(review, dict):
        raise MalformedReview("the body is not a JSON object")
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("no 'request' object in the AdmissionReview")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("the request has no 'uid'")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        raise MalformedReview(
            f"expected apiVersion {API_VERSION} kind {KIND}, got "
            f"{review.get('apiVersion')!r} {review.get('kind')!r}: set "
            "admissionReviewVersions: [v1] in the webhook configuration", uid
        )
    kind = request.get("kind") or {}
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or kind.get("group", "") != "":
        return uid, None
    if request.get("operation") != "CREATE" or request.get("subResource"):
        return uid, None
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise MalformedReview("a pod CREATE review without the pod in 'object'", uid)
    metadata = pod.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        # Found by fuzzing: this raised AttributeError, which became an HTTP 500.
        raise MalformedReview(f"the pod's metadata is a {type(metadata).__name__}, not an "
                              "object", uid)
    namespace = request.get("namespace") or (metadata or {}).get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise MalformedReview("a pod CREATE review without a namespace", uid)
    return uid, PodRequest(uid, namespace, pod, bool(request.get("dryRun")))


def review(
    body: bytes,
    mutate: Callable[[PodRequest], Mutation],
    failure_policy: FailurePolicy = "Ignore",
) -> Reviewed:
    """Answer one AdmissionReview: never raises, always a review to send with HTTP 200.

    A malformed review is allowed with a warning, or denied under ``failure_policy`` Fail
    (a pod the webhook could not read could not be injected either).
    """
    try:
        uid, request = parse(body)
    except Exception as exc:
        # Often no usable uid: the API server will not match this answer to a request, but a
        # client that sent garbage gets a readable reason instead of a stack trace.
        uid = exc.uid if isinstance(exc, MalformedReview) else ""
        reason = str(exc) if isinstance(exc, MalformedReview) else (
            f"it could not be read ({exc.__class__.__name__}: {exc})")
        if failure_policy == "Fail":
            message = ("pluto: malformed admission review, pod denied (failurePolicy is "
                       f"Fail): {reason}")
            return Reviewed(_answer(uid, allowed=False, message=message), "malformed",
                            warnings=[message])
        warning = f"pluto: malformed admission review, pod allowed unchanged: {reason}"
        return Reviewed(_answer(uid, warnings=[warning]), "malformed", warnings=[warning])
    if request is None:
        return Reviewed(_answer(uid), "skipped")
    try:
        mutation = mutate(request)
    except Exception as exc:
        logger.exception("injection failed for a pod in namespace %s", request.namespace)
        reason = f"{exc.__class__.__name__}: {exc}"
        if failure_policy == "Fail":
            message = f"pluto: could not inject the sidecar ({reason}); failurePolicy is Fail"
            return Reviewed(_answer(uid, allowed=False, message=message), "error", request, exc)
        warning = f"pluto: sidecar not injected, pod allowed unchanged: {reason}"
        return Reviewed(_answer(uid, warnings=[warning]), "error", request, exc, [warning])
    outcome = "patched" if mutation.patch else "unchanged"
    answer = _answer(uid, patch=mutation.patch, warnings=mutation.warnings)
    return Reviewed(answer, outcome, request, warnings=mutation.warnings)
