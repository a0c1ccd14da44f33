"""The webhook over real HTTPS: AdmissionReview v1 in, AdmissionReview v1 out, never a 500.

The listener runs on its own event loop thread with a certificate from ``certs.self_signed``;
requests go through httpx verifying that certificate against the generated CA, as the API
server verifies ``caBundle``.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.admission import apply_answer, patch_of, pod_review
from support.webhook_https import LoopThread, Webhook, WebhookServers

from pluto_operator.admission import Mutation, PodRequest
from pluto_operator.certs import ReloadingContext, self_signed, write_certificate
from pluto_operator.servers import WEBHOOK_PATH, WebhookListener


@pytest.fixture
def start_webhook(tmp_path: Path) -> Iterator[Callable[..., Webhook]]:
    servers = WebhookServers(tmp_path)
    yield servers.start
    servers.close()


def labelled_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "sft-", "labels": {"pluto.dev/run": "sft"}},
            "spec": {"containers": [{"name": "c", "image": "i", "command": ["x"]}]}}


def test_pod_create_is_patched_and_answered_for_its_uid(
        start_webhook: Callable[..., Webhook]) -> None:
    hook = start_webhook()
    review = pod_review(labelled_pod(), "ml", uid="4f1c-uid")
    response = hook.post(review)
    assert response.status_code == 200
    answer = response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "4f1c-uid"
    assert answer["response"]["allowed"] is True
    mutated = apply_answer(labelled_pod(), answer)
    assert mutated["spec"]["initContainers"][0]["name"] == "pluto-sidecar"
    # Reinvocation: the API server sends the mutated pod again; nothing more is added.
    again = hook.post(pod_review(mutated, "ml")).json()
    assert patch_of(again) == [] and again["response"]["allowed"] is True


#: Reviews the webhook cannot read (what a broken or hostile client could send).
MALFORMED = [
    b"not json at all",
    b"[1, 2, 3]",
    b"{}",
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                "request": {"uid": "x"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "x", "kind": {"kind": "Pod", "group": ""},
                            "operation": "CREATE", "namespace": "ml"}}).encode(),
    b"",
]
MALFORMED_IDS = ["text", "array", "empty-object", "no-request", "v1beta1", "pod-missing",
                 "empty"]


@pytest.mark.parametrize("body", MALFORMED, ids=MALFORMED_IDS)
def test_malformed_reviews_get_an_allowed_answer_with_a_warning(
        start_webhook: Callable[..., Webhook], body: bytes) -> None:
    response = start_webhook().post(body)
    assert response.status_code == 200
    answer = response.json()["response"]
    assert answer["allowed"] is True
    assert "patch" not in answer
    assert answer["warnings"][0].startswith("pluto: malformed admission review")


@pytest.mark.parametrize("body", MALFORMED, ids=MALFORMED_IDS)
def test_malformed_reviews_are_denied_with_the_reason_under_failure_policy_fail(
        start_webhook: Callable[..., Webhook], body: bytes) -> None:
    response = start_webhook(failure_policy="Fail").post(body)
    assert response.status_code == 200
    answer = response.json()["response"]
    assert answer["allowed"] is False and "patch" not in answer
    assert answer["status"]["message"].startswith("pluto: malformed admission review, pod "
                                                  "denied")


def test_other_operations_and_kinds_pass_untouched(
        start_webhook: Callable[..., Webhook]) -> None:
    hook = start_webhook()
    update = hook.post(pod_review(labelled_pod(), "ml", operation="UPDATE")).json()
    assert update["response"] == {"uid": update["response"]["uid"], "allowed": True}
    review = pod_review(labelled_pod(), "ml")
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    other = hook.post(review).json()
    assert other["response"]["allowed"] is True and "patch" not in other["response"]


def broken(_: PodRequest) -> Mutation:
    raise RuntimeError("cache exploded")


def test_internal_error_fails_open_by_default(start_webhook: Callable[..., Webhook]) -> None:
    response = start_webhook(broken).post(pod_review(labelled_pod(), "ml"))
    assert response.status_code == 200
    answer = response.json()["response"]
    assert answer["allowed"] is True and "patch" not in answer
    assert "cache exploded" in answer["warnings"][0]


def test_internal_error_denies_when_failure_policy_is_fail(
        start_webhook: Callable[..., Webhook]) -> None:
    response = start_webhook(broken, failure_policy="Fail").post(
        pod_review(labelled_pod(), "ml"))
    assert response.status_code == 200
    answer = response.json()["response"]
    assert answer["allowed"] is False
    assert "cache exploded" in answer["status"]["message"]


def test_plain_http_is_refused(start_webhook: Callable[..., Webhook]) -> None:
    hook = start_webhook()
    with pytest.raises(httpx.HTTPError):
        httpx.post(hook.url.replace("https://", "http://"), content=b"{}", timeout=5)


def test_certificate_does_not_verify_against_another_ca(
        start_webhook: Callable[..., Webhook], tmp_path: Path) -> None:
    hook = start_webhook()
    other = tmp_path / "other-ca.pem"
    other.write_bytes(self_signed(["localhost"]).ca_pem)
    with (httpx.Client(verify=ssl.create_default_context(cafile=str(other))) as client,
          pytest.raises(httpx.ConnectError)):
        client.post(hook.url, content=b"{}")


def test_a_host_longer_than_a_common_name_still_gets_a_certificate() -> None:
    """X.509 caps the common name at 64 characters; ``--dev --webhook-url`` with a longer host
    (a tunnel's generated name) made the operator fail at start."""
    from cryptography import x509

    host = "webhook-" + "a" * 60 + ".tunnel.example.com"
    cert = x509.load_pem_x509_certificate(self_signed([host, "localhost"]).cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in names.get_values_for_type(x509.DNSName)


def test_rotated_certificate_files_are_picked_up(tmp_path: Path) -> None:
    first, second = self_signed(["localhost"]), self_signed(["localhost"])
    cert_file, key_file = write_certificate(first, tmp_path)
    tls = ReloadingContext(cert_file, key_file, check_every=0.01)
    assert tls.reload_if_changed() is False
    write_certificate(second, tmp_path)
    # Same-second rewrites keep mtime on coarse filesystems: move it on explicitly.
    later = time.time() + 5
    os.utime(cert_file, (later, later))
    os.utime(key_file, (later, later))
    assert tls.reload_if_changed() is True
    # The context now serves the second certificate: a client trusting only its CA connects.
    loop = LoopThread()
    listener = WebhookListener(broken, failure_policy="Ignore")
    try:
        loop.run(listener.start("127.0.0.1", 0, tls.context))
        ca = tmp_path / "second-ca.pem"
        ca.write_bytes(second.ca_pem)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
            response = client.post(f"https://localhost:{listener.port}{WEBHOOK_PATH}",
                                   content=json.dumps(pod_review(labelled_pod())).encode())
        assert response.status_code == 200
    finally:
        loop.run(listener.stop())
        loop.close()
