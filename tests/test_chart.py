"""The Helm chart ``charts/pluto``: what ``helm install pluto charts/pluto`` creates.

Rendered by Helm's own engine, not a re-implementation: ``helm_python`` binds libhelm_c (Helm
v4's Go SDK). ``install`` below is ``helm install --dry-run=client``: values checked against
``values.schema.json``, templates rendered, NOTES.txt rendered, no cluster contacted.

What these tests pin:

- the chart lints clean and installs for the default values and every documented variation
  (cert-manager, no server, PostgreSQL, S3, classic sidecars, failurePolicy Fail, watched
  namespaces, existing ServiceAccounts, another release name and namespace);
- every rendered manifest, and the CRD, is a valid object of Kubernetes 1.28 through 1.33
  (kubernetes-validate, strict: an unknown field is an error);
- the webhook configuration: pods CREATE only, timeout and failure policy from values, the
  objectSelector excludes the chart's own pods and opted-out pods but covers training pods,
  the namespaceSelector excludes the control plane's namespaces;
- TLS: the caBundle verifies the generated server certificate, whose SANs name the Service;
  an upgrade reuses the certificates in the existing Secret; cert-manager mode wires the
  Certificate, its Secret and the CA-injection annotation together;
- RBAC grants exactly what the reconciler and the webhook use, with no wildcard;
- the server keeps SQLite on a PVC by default, and with PostgreSQL takes the URL from a Secret
  and has no PVC;
- ``values.schema.json`` makes Helm refuse a typo'd key or an out-of-range value;
- the chart, docs/helm.md, docs/operator.md, the Dockerfile and the ``pluto`` CLI agree.

Not checked here, for want of a cluster: that the pods start and pass their probes, that the API
server calls the webhook, that cert-manager issues the certificate. cert-manager's Issuer and
Certificate are custom resources with no schema in kubernetes-validate; their fields are
checked by hand (``test_cert_manager_objects_by_hand``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import json
import re
import shlex
import threading
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import helm_python as helm
import jsonschema
import kmock
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from pluto.cli import build_parser
from pluto_operator.crd import crd_yaml
from pluto_operator.webhook_config import dev_configuration

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "pluto"
KUBERNETES_VERSIONS = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]

# Custom resources the chart renders whose schemas kubernetes-validate does not have: they are
# validated against nothing upstream, and checked field by field in this file instead.
NO_UPSTREAM_SCHEMA = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
CLUSTER_SCOPED_KINDS = {
    "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
    "CustomResourceDefinition",
}


# -- rendering ---------------------------------------------------------------------------------


class Scenario(NamedTuple):
    values: dict[str, Any]
    release: str = "pluto"
    namespace: str = "pluto"


SCENARIOS: dict[str, Scenario] = {
    "defaults": Scenario({}),
    "cert-manager": Scenario({"webhook": {"certManager": {"enabled": True}}}),
    "no server": Scenario({
        "server": {"enabled": False},
        "serverUrl": "https://pluto.example.com",
    }),
    "postgresql": Scenario({
        "server": {"postgresql": {"enabled": True,
                                  "urlSecret": {"name": "pluto-db", "key": "database-url"}}},
    }),
    "s3": Scenario({"server": {"s3": {
        "bucket": "ml-runs", "prefix": "/pluto/prod/", "endpoint": "http://minio.minio.svc:9000",
        "region": "eu-west-1", "credentialsSecret": {"name": "pluto-s3"},
    }}}),
    "classic sidecars": Scenario({"sidecar": {
        "mode": "classic", "image": "registry.example.com/pluto:dev",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "1Gi"}},
    }}),
    "failurePolicy Fail": Scenario({"webhook": {"failurePolicy": "Fail", "timeoutSeconds": 10}}),
    "watched namespaces": Scenario({
        "namespaces": ["ml", "research"], "defaultProject": "llm", "logLevel": "DEBUG",
    }),
    "one webhook replica": Scenario({"webhook": {"replicas": 1, "affinity": {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"},
            ]}],
        }},
    }}}),
    "existing service accounts, placement": Scenario({
        "operator": {"serviceAccount": {"create": False, "name": "ops-reconciler"},
                     "nodeSelector": {"pool": "system"},
                     "tolerations": [{"key": "system", "operator": "Exists",
                                      "effect": "NoSchedule"}]},
        "webhook": {"serviceAccount": {"create": False, "name": "ops-webhook"}},
        "server": {"serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/pluto"}}},
        "imagePullSecrets": [{"name": "ghcr"}],
        "apiKeySecret": {"name": "tracker-key", "key": "token"},
    }),
    "another release and namespace": Scenario(
        {"image": {"tag": "0.2.0-rc.1", "pullPolicy": "Always"}}, "tracker", "mlops"),
}


@dataclass(frozen=True)
class Release:
    """What ``helm install --dry-run=client`` produced: the manifests and NOTES.txt."""

    scenario: Scenario
    manifests: list[dict[str, Any]]
    notes: str
    text: str = field(repr=False)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.all(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def named(self, component: str) -> str:
        return f"{self.scenario.release}-{component}"

    def container(self, deployment: str) -> dict[str, Any]:
        pod = self.one("Deployment", self.named(deployment))["spec"]["template"]["spec"]
        containers: list[dict[str, Any]] = pod["containers"]
        assert len(containers) == 1
        return containers[0]


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


@functools.cache
def _install(release: str, namespace: str, values_json: str) -> Release:
    # Client-only: nothing is sent anywhere; the memory driver stores no release.
    config = helm.Config(storage_driver="memory", namespace=namespace)
    try:
        result = config.install(chart(), release, json.loads(values_json), dry_run="client",
                                namespace=namespace)
    finally:
        config.close()
    manifest: str = result["manifest"]
    docs = [doc for doc in yaml.safe_load_all(manifest) if doc is not None]
    scenario = Scenario(json.loads(values_json), release, namespace)
    return Release(scenario, docs, str(result["notes"]), manifest)


def install(scenario: Scenario) -> Release:
    return _install(scenario.release, scenario.namespace,
                    json.dumps(scenario.values, sort_keys=True))


def install_error(values: dict[str, Any]) -> str:
    """The message Helm refuses ``values`` with (the test fails if it does not refuse)."""
    with pytest.raises(helm.HelmError) as refused:
        install(Scenario(values))
    return str(refused.value)


def merged_values(scenario: Scenario) -> dict[str, Any]:
    """The values the release ran with: the chart's defaults under the scenario's."""
    return chart().merge_values(scenario.values)


def webhook_of(release: Release) -> dict[str, Any]:
    configs = release.all("MutatingWebhookConfiguration")
    assert len(configs) == 1
    webhooks: list[dict[str, Any]] = configs[0]["webhooks"]
    assert len(webhooks) == 1
    return webhooks[0]


def pod_templates(release: Release) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in release.all("Deployment")}


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# -- Kubernetes label selectors ------------------------------------------------------------------


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether ``selector`` (matchLabels and matchExpressions) selects ``labels``.

    The API server's semantics: every term must hold; NotIn holds for a missing label;
    an empty selector selects everything.
    """
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.get("matchExpressions", []):
        key, operator = requirement["key"], requirement["operator"]
        values = requirement.get("values", [])
        if operator == "In":
            holds = key in labels and labels[key] in values
        elif operator == "NotIn":
            holds = key not in labels or labels[key] not in values
        elif operator == "Exists":
            holds = key in labels
        elif operator == "DoesNotExist":
            holds = key not in labels
        else:
            raise ValueError(f"unknown selector operator {operator!r}")
        if not holds:
            return False
    return True


def test_selector_evaluator_reads_selectors_like_kubernetes() -> None:
    # The evaluator the webhook tests below rely on, pinned on its own.
    labels = {"app": "train", "tier": "gpu"}
    assert selects({}, labels)
    assert selects({"matchLabels": {"app": "train"}}, labels)
    assert not selects({"matchLabels": {"app": "serve"}}, labels)
    assert selects({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["a"]}]},
                   labels)
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "NotIn",
                                              "values": ["gpu"]}]}, labels)
    assert not selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
                       labels)
    assert not selects({"matchExpressions": [{"key": "x", "operator": "In", "values": ["a"]}]},
                       labels)
    assert selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)


# -- Helm accepts the chart ------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_chart_lints_clean_for_every_supported_version(version: str) -> None:
    report = helm.lint(CHART_DIR, strict=True, namespace="pluto", kube_version=f"v{version}.0")
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems
    assert report["errors"] == []


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_chart_lints_clean_with_values(scenario: Scenario) -> None:
    report = helm.lint(CHART_DIR, scenario.values, strict=True, namespace=scenario.namespace)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_installs_into_the_release_namespace(scenario: Scenario) -> None:
    release = install(scenario)
    assert release.notes.strip()
    for manifest in release.manifests:
        metadata = manifest["metadata"]
        if manifest["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in metadata, metadata["name"]
        elif manifest["kind"] != "RoleBinding":  # those go to the watched namespaces
            assert metadata["namespace"] == scenario.namespace, metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/instance"] == scenario.release
    # No two objects of one kind share a name and namespace: the API server would refuse.
    keys = [(m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"])
            for m in release.manifests]
    assert len(keys) == len(set(keys))


# -- Kubernetes accepts every object -----------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(version: str, scenario: Scenario) -> None:
    for manifest in install(scenario).manifests:
        gvk = (manifest["apiVersion"], manifest["kind"])
        if gvk in NO_UPSTREAM_SCHEMA:
            # Pinned, so that the day kubernetes-validate knows the kind, this says to use it.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(manifest, version, strict=True)
            continue
        try:
            validated = kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{gvk} {manifest['metadata']['name']}: {error.message} "
                        f"at {list(error.absolute_path)}")
        assert validated == version


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crds_are_valid_kubernetes_objects(version: str) -> None:
    files = sorted((ROOT / "crds").glob("*.yaml")) + sorted((CHART_DIR / "crds").glob("*.yaml"))
    assert files
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            assert kubernetes_validate.validate(document, version, strict=True) == version


def test_chart_crds_are_the_generated_crds_byte_for_byte() -> None:
    # Helm installs CRDs only from the chart's own crds/; the copy must not drift.
    chart_files = sorted(p.name for p in (CHART_DIR / "crds").iterdir())
    assert chart_files == sorted(p.name for p in (ROOT / "crds").iterdir())
    for name in chart_files:
        assert (CHART_DIR / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/pluto/crds/{name} differs from crds/{name}; regenerate both: python -m "
            "pluto_operator.crd --output crds/plutorun.yaml "
            "--output charts/pluto/crds/plutorun.yaml"
        )
    assert (CHART_DIR / "crds" / "plutorun.yaml").read_text() == crd_yaml()
    # ... and Helm sees it as the chart's one CRD.
    assert [crd["name"] for crd in chart().crds] == ["crds/plutorun.yaml"]


def test_crd_module_writes_every_output(tmp_path: Path) -> None:
    from pluto_operator.crd import main

    first, second = tmp_path / "a.yaml", tmp_path / "chart" / "b.yaml"
    second.parent.mkdir()
    assert main(["--output", str(first), "-o", str(second)]) == 0
    assert first.read_text() == second.read_text() == crd_yaml()


def test_cert_manager_objects_by_hand() -> None:
    release = install(SCENARIOS["cert-manager"])
    issuer = release.one("Issuer", release.named("webhook-selfsigned"))
    certificate = release.one("Certificate", release.named("webhook"))
    assert set(issuer["spec"]) == {"selfSigned"}
    assert certificate["spec"]["issuerRef"] == {"kind": "Issuer",
                                               "name": issuer["metadata"]["name"]}
    spec = certificate["spec"]
    assert set(spec) <= {"secretName", "dnsNames", "duration", "issuerRef", "privateKey"}
    assert re.fullmatch(r"\d+h", spec["duration"])
    assert spec["privateKey"]["algorithm"] in {"RSA", "ECDSA", "Ed25519"}


def test_cert_manager_certificate_for_long_release_and_namespace_names() -> None:
    """X.509 caps a common name at 64 characters and cert-manager refuses a Certificate whose
    commonName is longer: with names like these "<service>.<namespace>.svc" is 100+."""
    namespace = "ml-platform-training-jobs-europe-west4-production"
    release = _install("experiment-tracker-production", namespace,
                       json.dumps(SCENARIOS["cert-manager"].values))
    certificate = release.one("Certificate", release.named("webhook"))
    spec = certificate["spec"]
    assert len(spec.get("commonName", "")) <= 64, spec["commonName"]
    service = webhook_of(release)["clientConfig"]["service"]
    assert f"{service['name']}.{namespace}.svc" in spec["dnsNames"]


# -- the webhook configuration ------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_webhook_configuration_follows_values(scenario: Scenario) -> None:
    release = install(scenario)
    values = merged_values(scenario)["webhook"]
    webhook = webhook_of(release)
    assert webhook["timeoutSeconds"] == values["timeoutSeconds"] <= 10
    assert webhook["failurePolicy"] == values["failurePolicy"]
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""],
                                 "apiVersions": ["v1"], "resources": ["pods"],
                                 "scope": "Namespaced"}]
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["sideEffects"] == "NoneOnDryRun"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["matchPolicy"] == "Equivalent"
    # The webhook itself applies the same policy to its own internal errors.
    assert f"--failure-policy={values['failurePolicy']}" in release.container("webhook")["args"]


def test_webhook_defaults_fail_open_within_five_seconds() -> None:
    webhook = webhook_of(install(SCENARIOS["defaults"]))
    assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Ignore", 5)


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_webhook_reaches_the_webhook_pods_over_tls(scenario: Scenario) -> None:
    release = install(scenario)
    target = webhook_of(release)["clientConfig"]["service"]
    assert target["path"] == "/mutate-pods"
    assert target["namespace"] == scenario.namespace
    service = release.one("Service", target["name"])
    [port] = [p for p in service["spec"]["ports"] if p["port"] == target["port"] == 443]
    template = pod_templates(release)[release.named("webhook")]
    assert selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
    container = release.container("webhook")
    [container_port] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert container_port["containerPort"] == 9443
    assert "--webhook-port=9443" in container["args"]
    # The certificate and key flags point into the mounted TLS Secret.
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "webhook-tls"]
    assert volume["secret"]["secretName"] == release.named("webhook-tls")
    assert f"--tls-cert-file={mount['mountPath']}/tls.crt" in container["args"]
    assert f"--tls-key-file={mount['mountPath']}/tls.key" in container["args"]


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_object_selector_excludes_the_charts_own_pods(scenario: Scenario) -> None:
    release = install(scenario)
    selector = webhook_of(release)["objectSelector"]
    templates = pod_templates(release)
    assert {release.named("operator"), release.named("webhook")} <= set(templates)
    for name, template in templates.items():
        labels = template["metadata"]["labels"]
        assert "pluto.dev/component" in labels, name
        assert not selects(selector, labels), f"the webhook would be called for {name}'s pods"


TRAINING_PODS = {
    # A Konduktor task's pod: JobSet labels, no pluto label at all (namespace mode).
    "konduktor jobset": {"jobset.sigs.k8s.io/jobset-name": "llama-sft", "parent": "trainy",
                         "batch.kubernetes.io/job-completion-index": "0"},
    "named PlutoRun": {"pluto.dev/run": "llama-sft", "app": "train"},
    "plain job": {"batch.kubernetes.io/job-name": "sweep-1"},
    "opted in explicitly": {"pluto.dev/inject": "enabled"},
}


@pytest.mark.parametrize("labels", TRAINING_PODS.values(), ids=TRAINING_PODS.keys())
def test_object_selector_covers_training_pods(labels: dict[str, str]) -> None:
    selector = webhook_of(install(SCENARIOS["defaults"]))["objectSelector"]
    assert selects(selector, labels)
    assert not selects(selector, {**labels, "pluto.dev/inject": "disabled"})


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_namespace_selector_leaves_the_control_plane_alone(scenario: Scenario) -> None:
    selector = webhook_of(install(scenario))["namespaceSelector"]
    # The API server labels every namespace with its own name.
    for namespace in ("kube-system", "kube-public", "kube-node-lease"):
        assert not selects(selector, {"kubernetes.io/metadata.name": namespace})
    watched = merged_values(scenario)["namespaces"]
    for namespace in watched or ["ml", "default", scenario.namespace]:
        assert selects(selector, {"kubernetes.io/metadata.name": namespace,
                                  "pluto.dev/inject": "enabled"})
    if watched:
        assert not selects(selector, {"kubernetes.io/metadata.name": "elsewhere"})


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_dev_mode_configuration_selects_what_the_charts_does(scenario: Scenario) -> None:
    """``pluto operator --dev --namespace NS`` covers the same pods as the chart with
    ``namespaces: [NS]``: without the In expression, pods of unwatched namespaces were injected
    with runs that no reconciler opens or finishes."""
    chart_hook = webhook_of(install(scenario))
    watched = merged_values(scenario)["namespaces"] or ()
    [dev_hook] = dev_configuration("pluto-dev-webhook", "https://10.0.0.1:9443", b"CA",
                                   "Ignore", watched)["webhooks"]
    for key in ("namespaceSelector", "objectSelector", "rules"):
        assert dev_hook[key] == chart_hook[key], key
    if watched:
        assert not selects(dev_hook["namespaceSelector"],
                           {"kubernetes.io/metadata.name": "elsewhere"})


# -- TLS ---------------------------------------------------------------------------------------


def webhook_tls(release: Release) -> tuple[x509.Certificate, x509.Certificate, bytes]:
    """(CA from the caBundle, server certificate, server key PEM) of a chart-generated setup."""
    secret = release.one("Secret", release.named("webhook-tls"))
    assert secret["type"] == "kubernetes.io/tls"
    ca_bundle = webhook_of(release)["clientConfig"]["caBundle"]
    assert ca_bundle == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(b64(ca_bundle))
    certificate = x509.load_pem_x509_certificate(b64(secret["data"]["tls.crt"]))
    return ca, certificate, b64(secret["data"]["tls.key"])


@pytest.mark.parametrize(
    "scenario",
    [s for s in SCENARIOS.values() if s is not SCENARIOS["cert-manager"]],
    ids=[k for k in SCENARIOS if k != "cert-manager"],
)
def test_ca_bundle_verifies_the_generated_server_certificate(scenario: Scenario) -> None:
    release = install(scenario)
    ca, certificate, key_pem = webhook_tls(release)
    certificate.verify_directly_issued_by(ca)  # raises unless signed by the caBundle's CA
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_constraints.ca
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    # The API server calls https://<service>.<namespace>.svc: that name must be in the SANs.
    names = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    service = f"{release.named('webhook')}.{scenario.namespace}"
    assert {f"{service}.svc", f"{service}.svc.cluster.local"} <= set(names)
    # The key in the Secret is the certificate's.
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == certificate.public_key()
    days = merged_values(scenario)["webhook"]["certValidityDays"]
    lifetime = certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime > datetime.timedelta(days=days - 2)


def test_ca_bundle_check_would_catch_a_foreign_certificate() -> None:
    # Pins that verify_directly_issued_by above proves something: another install's CA (same
    # name, fresh key; genCA is random) does not verify this install's certificate.
    ca, _, _ = webhook_tls(install(SCENARIOS["defaults"]))
    _, other_certificate, _ = webhook_tls(install(SCENARIOS["s3"]))
    with pytest.raises(InvalidSignature):
        other_certificate.verify_directly_issued_by(ca)


def test_cert_manager_mode_wires_certificate_secret_and_ca_injection() -> None:
    release = install(SCENARIOS["cert-manager"])
    namespace = release.scenario.namespace
    # cert-manager owns the Secret and the caBundle; the chart writes neither.
    assert release.all("Secret") == []
    config = release.all("MutatingWebhookConfiguration")[0]
    assert "caBundle" not in webhook_of(release)["clientConfig"]
    source = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    certificate_namespace, certificate_name = source.split("/")
    assert certificate_namespace == namespace
    certificate = release.one("Certificate", certificate_name)
    # The Secret cert-manager writes is the one the webhook pods mount.
    template = pod_templates(release)[release.named("webhook")]
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "webhook-tls"]
    assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
    assert f"{release.named('webhook')}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    issuer = release.one("Issuer", certificate["spec"]["issuerRef"]["name"])
    assert issuer["spec"] == {"selfSigned": {}}


@contextmanager
def api_server_holding(*objects: dict[str, Any]) -> Iterator[str]:
    """An in-memory stand-in for the Kubernetes API (kmock's emulator) serving ``objects``.

    There is no cluster here, and ``lookup``, which the upgrade path depends on, only ever
    reads from one; this gives Helm's real engine something real to read over HTTP.
    """
    ready = threading.Event()
    stop = threading.Event()
    url: list[str] = []

    async def serve() -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources["v1/secrets"] = kmock.ResourceInfo(
                kind="Secret", namespaced=True, verbs={"get", "list"})
            for obj in objects:
                key = ("v1/secrets", obj["metadata"]["namespace"], obj["metadata"]["name"])
                emulator.objects[key] = obj
            url.append(str(server.url))
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the stand-in API server did not start"
        yield url[0]
    finally:
        stop.set()
        thread.join(30)


def admission_objects(url: str, release: str, namespace: str) -> dict[str, dict[str, Any]]:
    """webhook-admission.yaml as ``helm upgrade`` renders it, ``lookup`` reading from ``url``."""
    config = helm.Config(kube_apiserver=url, kube_token="test", namespace=namespace)
    try:
        rendered = config.render(chart(), {}, name=release, namespace=namespace,
                                 is_install=False, is_upgrade=True)
    finally:
        config.close()
    documents = yaml.safe_load_all(rendered[f"{chart().name}/templates/webhook-admission.yaml"])
    return {doc["kind"]: doc for doc in documents if doc}


def test_upgrade_reuses_the_existing_certificates() -> None:
    first = install(SCENARIOS["defaults"])
    existing = first.one("Secret", first.named("webhook-tls"))
    with api_server_holding(existing) as url:
        upgraded = admission_objects(url, "pluto", "pluto")
    assert upgraded["Secret"]["data"] == existing["data"]
    ca_bundle = upgraded["MutatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_bundle == existing["data"]["ca.crt"]


def test_upgrade_replaces_an_incomplete_secret() -> None:
    first = install(SCENARIOS["defaults"])
    existing = first.one("Secret", first.named("webhook-tls"))
    # A Secret without the CA (e.g. written by hand) cannot produce a caBundle: start over.
    incomplete = {**existing, "data": {k: v for k, v in existing["data"].items()
                                       if k != "ca.crt"}}
    with api_server_holding(incomplete) as url:
        upgraded = admission_objects(url, "pluto", "pluto")
    data = upgraded["Secret"]["data"]
    assert data["tls.crt"] != existing["data"]["tls.crt"]
    ca = x509.load_pem_x509_certificate(b64(data["ca.crt"]))
    x509.load_pem_x509_certificate(b64(data["tls.crt"])).verify_directly_issued_by(ca)
    ca_bundle = upgraded["MutatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_bundle == data["ca.crt"]


# -- the operator's two Deployments ------------------------------------------------------------


def test_reconciler_is_one_pod_never_two() -> None:
    release = install(SCENARIOS["defaults"])
    operator = release.one("Deployment", "pluto-operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    assert "--role=reconciler" in release.container("operator")["args"]


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_webhook_replicas_spread_and_disruption_budget(scenario: Scenario) -> None:
    release = install(scenario)
    values = merged_values(scenario)["webhook"]
    webhook = release.one("Deployment", release.named("webhook"))
    assert webhook["spec"]["replicas"] == values["replicas"]
    assert webhook["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "--role=webhook" in release.container("webhook")["args"]
    templates = pod_templates(release)
    affinity = templates[release.named("webhook")]["spec"]["affinity"]
    if values["affinity"]:
        assert affinity == values["affinity"]
    else:
        [term] = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert selects(term["podAffinityTerm"]["labelSelector"],
                       templates[release.named("webhook")]["metadata"]["labels"])
    budgets = release.all("PodDisruptionBudget")
    if values["replicas"] == 1:
        assert budgets == []  # minAvailable 1 of 1 would block every node drain
        return
    [budget] = budgets
    assert budget["spec"]["minAvailable"] == 1
    covered = [name for name, template in templates.items()
               if selects(budget["spec"]["selector"], template["metadata"]["labels"])]
    assert covered == [release.named("webhook")]


@pytest.mark.parametrize("component", ["operator", "webhook"])
def test_operator_probes_are_on_the_health_port(component: str) -> None:
    container = install(SCENARIOS["defaults"]).container(component)
    [health] = [p for p in container["ports"] if p["name"] == "health"]
    assert health["containerPort"] == 8081
    assert "--health-port=8081" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_every_pod_is_locked_down(scenario: Scenario) -> None:
    for name, template in pod_templates(install(scenario)).items():
        pod = template["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            effective = {**pod["securityContext"], **container["securityContext"]}
            assert effective["runAsNonRoot"] is True, where
            assert effective["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"], where


def test_pod_user_is_the_images_user() -> None:
    # runAsNonRoot can only be checked against a numeric USER; both sides say 10001.
    dockerfile = (ROOT / "Dockerfile").read_text()
    [user] = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert user == "10001:10001"
    assert re.search(r'^ENTRYPOINT \["pluto"\]$', dockerfile, flags=re.MULTILINE)
    for template in pod_templates(install(SCENARIOS["defaults"])).values():
        context = template["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (10001, 10001)
        # The image's entrypoint is `pluto`: the first argument is the subcommand.
        assert template["spec"]["containers"][0]["args"][0] in {"operator", "server"}


def documented_operator_flags() -> set[str]:
    text = (ROOT / "docs" / "operator.md").read_text()
    section = text[text.index("## `pluto operator`"):]
    return set(re.findall(r"`(--[a-z-]+)", section))


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_operator_flags_are_the_documented_ones(scenario: Scenario) -> None:
    release = install(scenario)
    documented = documented_operator_flags()
    for component in ("operator", "webhook"):
        args = release.container(component)["args"]
        assert args[0] == "operator"
        flags = {arg.split("=", 1)[0] for arg in args[1:]}
        assert flags <= documented, flags - documented


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_operator_settings_follow_values(scenario: Scenario) -> None:
    release = install(scenario)
    values = merged_values(scenario)
    image = f"{values['image']['repository']}:{values['image']['tag'] or '0.1.0'}"
    secret = values["apiKeySecret"]
    if values["serverUrl"]:
        server_url = values["serverUrl"]
    else:
        server_url = f"http://{release.named('server')}.{scenario.namespace}.svc:7300"
    for component in ("operator", "webhook"):
        container = release.container(component)
        args = container["args"]
        assert container["image"] == image
        assert f"--server-url={server_url}" in args
        assert f"--api-key-secret={secret['name']}:{secret['key']}" in args
        assert f"--sidecar-image={values['sidecar']['image'] or image}" in args
        assert f"--sidecar-mode={values['sidecar']['mode']}" in args
        assert f"--log-level={values['logLevel']}" in args
        assert [a for a in args if a.startswith("--namespace=")] == [
            f"--namespace={ns}" for ns in values["namespaces"]]
        default_project = [a for a in args if a.startswith("--default-project=")]
        expected = [f"--default-project={values['defaultProject']}"]
        assert default_project == (expected if values["defaultProject"] else [])
    # The reconciler's own API key: the Secret mounted as a file the operator follows (a
    # rotated key needs no restart), optional so the operator starts before the key exists.
    reconciler = release.container("operator")
    assert {"--api-key-file=/var/run/pluto-api-key/api-key", "--api-key-optional"} <= set(
        reconciler["args"])
    [mount] = [m for m in reconciler["volumeMounts"] if m["mountPath"] == "/var/run/pluto-api-key"]
    assert mount["readOnly"] is True
    pod = release.one("Deployment", release.named("operator"))["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": secret["name"], "optional": True,
                                "items": [{"key": secret["key"], "path": "api-key"}]}
    assert "PLUTO_API_KEY" not in json.dumps(reconciler)
    # Only the reconciler calls the server; the webhook never sees the key.
    webhook = release.one("Deployment", release.named("webhook"))
    assert "PLUTO_API_KEY" not in json.dumps(webhook) and secret["name"] not in json.dumps(
        webhook["spec"]["template"]["spec"].get("volumes", []))
    [resources] = [e for e in release.container("webhook")["env"]
                   if e["name"] == "PLUTO_SIDECAR_RESOURCES"]
    assert json.loads(resources["value"]) == values["sidecar"]["resources"]


def test_without_the_server_a_server_url_is_required() -> None:
    error = install_error({"server": {"enabled": False}})
    assert "serverUrl is required" in error


# -- RBAC --------------------------------------------------------------------------------------

Grant = tuple[str, str, str, str]  # (where: "cluster" or a namespace, apiGroup, resource, verb)

# What each role uses, as tests/test_rbac.py sees the real processes use it.
EVENTS = {("", "events", "create")}
WATCH = ("list", "watch")
RECONCILER_NAMESPACED = (
    {("pluto.dev", "plutoruns", v) for v in (*WATCH, "create", "patch")}
    | {("pluto.dev", "plutoruns/status", "patch")}
    | {("", "pods", "list")}
    | {("batch", "jobs", "get")}
    | {("jobset.x-k8s.io", "jobsets", v) for v in ("get", *WATCH, "patch")}
    | EVENTS
)
RECONCILER_CLUSTER = (
    {("", "namespaces", v) for v in WATCH}
    | {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in WATCH}
)
WEBHOOK_NAMESPACED = {("pluto.dev", "plutoruns", v) for v in WATCH} | EVENTS
WEBHOOK_CLUSTER = (
    {("", "namespaces", v) for v in WATCH}
    | {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in WATCH}
)


def grants_of(release: Release, service_account: str) -> set[Grant]:
    """Everything the bindings give ``service_account`` of the release's namespace."""
    subject = {"kind": "ServiceAccount", "name": service_account,
               "namespace": release.scenario.namespace}
    roles = {("ClusterRole", r["metadata"]["name"]): r for r in release.all("ClusterRole")}
    roles |= {("Role", r["metadata"]["name"]): r for r in release.all("Role")}
    grants: set[Grant] = set()
    for binding in release.all("ClusterRoleBinding") + release.all("RoleBinding"):
        if subject not in binding["subjects"]:
            continue
        where = binding["metadata"].get("namespace", "cluster")
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants |= {(where, group, resource, verb) for verb in rule["verbs"]}
    return grants


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_rbac_has_no_wildcards(scenario: Scenario) -> None:
    release = install(scenario)
    for role in release.all("ClusterRole") + release.all("Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_rbac_grants_exactly_what_each_role_uses(scenario: Scenario) -> None:
    release = install(scenario)
    values = merged_values(scenario)
    # Namespaced permissions everywhere, or only in the watched namespaces.
    scopes = values["namespaces"] or ["cluster"]
    for component, namespaced, cluster in (
        ("operator", RECONCILER_NAMESPACED, RECONCILER_CLUSTER),
        ("webhook", WEBHOOK_NAMESPACED, WEBHOOK_CLUSTER),
    ):
        pod = pod_templates(release)[release.named(component)]["spec"]
        account = pod["serviceAccountName"]
        assert account == (values[component]["serviceAccount"]["name"]
                           or release.named(component))
        expected = {("cluster", *g) for g in cluster}
        expected |= {(scope, *g) for scope in scopes for g in namespaced}
        assert grants_of(release, account) == expected
    # The server needs no API access at all.
    if values["server"]["enabled"]:
        server = pod_templates(release)[release.named("server")]["spec"]
        assert server["automountServiceAccountToken"] is False
        assert grants_of(release, server["serviceAccountName"]) == set()


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_service_accounts_are_created_unless_named(scenario: Scenario) -> None:
    release = install(scenario)
    values = merged_values(scenario)
    created = {sa["metadata"]["name"] for sa in release.all("ServiceAccount")}
    for component, template in (("operator", "operator"), ("webhook", "webhook"),
                                 ("server", "server")):
        if component == "server" and not values["server"]["enabled"]:
            continue
        account = pod_templates(release)[release.named(template)]["spec"]["serviceAccountName"]
        assert (account in created) == values[component]["serviceAccount"]["create"]


# -- the tracking server -----------------------------------------------------------------------


def test_server_keeps_sqlite_on_a_persistent_volume() -> None:
    release = install(SCENARIOS["defaults"])
    deployment = release.one("Deployment", "pluto-server")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = release.container("server")
    assert container["args"] == ["server", "--host=0.0.0.0", "--port=7300", "--data-dir=/data",
                                 "--public-url=http://pluto-server.pluto.svc:7300"]
    [claim] = release.all("PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    # Uninstalling must not delete every run.
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    [data] = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == data["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "env" not in container  # no database URL: SQLite in --data-dir


def test_server_is_reachable_on_its_service() -> None:
    release = install(SCENARIOS["defaults"])
    service = release.one("Service", "pluto-server")
    [port] = service["spec"]["ports"]
    assert port["port"] == 7300
    template = pod_templates(release)["pluto-server"]
    assert selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
    [container_port] = [p for p in release.container("server")["ports"]
                        if p["name"] == port["targetPort"]]
    assert container_port["containerPort"] == 7300
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert release.container("server")[probe]["httpGet"]["path"] == "/api/v1/health"


def test_storage_class_and_size_come_from_values() -> None:
    release = install(Scenario({"server": {"persistence": {"size": "200Gi",
                                                           "storageClass": "fast-ssd"}}}))
    [claim] = release.all("PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_server_on_postgresql_reads_the_url_from_a_secret_and_has_no_volume() -> None:
    release = install(SCENARIOS["postgresql"])
    assert release.all("PersistentVolumeClaim") == []
    container = release.container("server")
    [url] = [e for e in container["env"] if e["name"] == "PLUTO_DATABASE_URL"]
    assert url == {"name": "PLUTO_DATABASE_URL", "valueFrom": {"secretKeyRef": {
        "name": "pluto-db", "key": "database-url"}}}
    assert "postgresql://" not in release.text
    volumes = pod_templates(release)["pluto-server"]["spec"]["volumes"]
    assert not any("persistentVolumeClaim" in v for v in volumes)


def test_postgresql_url_cannot_be_given_as_a_value() -> None:
    # There is no key for a literal URL: it would end up in the release's stored values.
    error = install_error({"server": {"postgresql": {
        "enabled": True, "url": "postgresql://pluto:secret@db/pluto"}}})
    assert "url" in error
    error = install_error({"server": {"postgresql": {"enabled": True}}})
    assert "urlSecret" in error


def test_server_s3_settings_become_environment() -> None:
    env = {e["name"]: e for e in install(SCENARIOS["s3"]).container("server")["env"]}
    assert env["PLUTO_STORAGE"]["value"] == "s3://ml-runs/pluto/prod"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "pluto-s3", "key": "access-key-id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "pluto-s3", "key": "secret-access-key"}
    bare = install(Scenario({"server": {"s3": {"bucket": "runs"}}})).container("server")["env"]
    assert bare == [{"name": "PLUTO_STORAGE", "value": "s3://runs"}]


def test_no_server_means_no_server_objects() -> None:
    release = install(SCENARIOS["no server"])
    names = {m["metadata"]["name"] for m in release.manifests}
    assert not {n for n in names if n.startswith("pluto-server")}
    assert "--server-url=https://pluto.example.com" in release.container("operator")["args"]


# -- NOTES.txt ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario",
    [SCENARIOS["defaults"], SCENARIOS["postgresql"], SCENARIOS["another release and namespace"],
     SCENARIOS["existing service accounts, placement"]],
    ids=["defaults", "postgresql", "another release", "own api key secret"],
)
def test_notes_say_how_to_create_the_api_key(scenario: Scenario) -> None:
    release = install(scenario)
    values = merged_values(scenario)
    [line] = [ln for ln in release.notes.splitlines() if "pluto keys create" in ln]
    exec_part, command = line.split(" -- ", 1)
    assert f"kubectl -n {scenario.namespace} exec deploy/{release.named('server')}" in exec_part
    release.one("Deployment", release.named("server"))  # the Deployment it execs into exists
    argv = shlex.split(command.rstrip(")"))
    assert argv[0] == "pluto"
    parsed = build_parser().parse_args(argv[1:])  # the real CLI accepts it
    assert (parsed.command, parsed.keys_command, str(parsed.data_dir)) == ("keys", "create",
                                                                            "/data")
    secret = values["apiKeySecret"]
    assert (f"kubectl -n {scenario.namespace} create secret generic {secret['name']} "
            f"--from-literal={secret['key']}=") in release.notes
    # The operator follows its mounted key file: no restart to pick the Secret up.
    assert "rollout restart" not in release.notes
    assert "kubectl label namespace" in release.notes
    assert "pluto.dev/inject=enabled" in release.notes


def test_notes_without_the_server_point_at_the_given_one() -> None:
    notes = install(SCENARIOS["no server"]).notes
    assert "kubectl exec" not in notes and "exec deploy/" not in notes
    assert "https://pluto.example.com" in notes


# -- values.schema.json ------------------------------------------------------------------------

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "typo at the top": ({"webhok": {"replicas": 3}}, "webhok"),
    "typo in webhook": ({"webhook": {"timeoutSecond": 5}}, "timeoutSecond"),
    "typo in server": ({"server": {"persistance": {"size": "1Gi"}}}, "persistance"),
    "timeoutSeconds 30": ({"webhook": {"timeoutSeconds": 30}}, "timeoutSeconds"),
    "timeoutSeconds 0": ({"webhook": {"timeoutSeconds": 0}}, "timeoutSeconds"),
    "failurePolicy Warn": ({"webhook": {"failurePolicy": "Warn"}}, "failurePolicy"),
    "sidecar mode sidecar": ({"sidecar": {"mode": "sidecar"}}, "mode"),
    "log level verbose": ({"logLevel": "verbose"}, "logLevel"),
    "zero webhook replicas": ({"webhook": {"replicas": 0}}, "replicas"),
    "operator replicas": ({"operator": {"replicas": 2}}, "replicas"),
    "namespace with capitals": ({"namespaces": ["ML"]}, "namespaces"),
    "quantity 2GB": ({"server": {"persistence": {"size": "2GB"}}}, "size"),
    "server url without scheme": ({"serverUrl": "pluto:7300"}, "serverUrl"),
}


@pytest.mark.parametrize("values, names", REFUSED.values(), ids=REFUSED.keys())
def test_helm_refuses_bad_values(values: dict[str, Any], names: str) -> None:
    error = install_error(values)
    assert "schema" in error and names in error
    # helm lint reports the same.
    report = helm.lint(CHART_DIR, values, namespace="pluto")
    assert report["errors"]


def test_schema_is_draft_7_and_accepts_the_defaults() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)


def leaf_paths(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of the values the schema describes, down to scalars and free-form maps."""
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    if node.get("type") != "object" or "properties" not in node:
        return {prefix}
    paths: set[str] = set()
    for name, sub in node["properties"].items():
        paths |= leaf_paths(schema, sub, f"{prefix}.{name}" if prefix else name)
    return paths


def value_paths(values: Any, schema_paths: set[str], prefix: str = "") -> set[str]:
    if prefix in schema_paths or not isinstance(values, dict):
        return {prefix}
    paths: set[str] = set()
    for name, sub in values.items():
        paths |= value_paths(sub, schema_paths, f"{prefix}.{name}" if prefix else name)
    return paths


def test_schema_values_and_docs_name_the_same_values() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    in_schema = leaf_paths(schema, schema) - {"global"}
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    # Every value has a default in values.yaml and a place in the schema.
    assert value_paths(defaults, in_schema) == in_schema
    # docs/helm.md's table lists every value.
    docs = (ROOT / "docs" / "helm.md").read_text()
    undocumented = {path for path in in_schema if f"`{path}`" not in docs}
    assert undocumented == set()


# -- image and versions ------------------------------------------------------------------------


def test_image_tag_follows_the_chart_and_the_package_version() -> None:
    metadata = chart().metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert metadata["appVersion"] == project["version"]
    release = install(SCENARIOS["defaults"])
    image = f"ghcr.io/pluto-dev/pluto:{metadata['appVersion']}"
    for component in ("operator", "webhook", "server"):
        assert release.container(component)["image"] == image
    assert f"--sidecar-image={image}" in release.container("webhook")["args"]


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_the_real_cli_accepts_what_the_chart_renders(
        scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered args and env go through ``pluto operator``'s own parser and settings, so
    a flag the chart passes but the operator lacks (or a malformed value) fails here, not in a
    CrashLoopBackOff."""
    from pluto.cli import build_parser
    from pluto_operator.cli import settings_from

    release = install(scenario)
    values = merged_values(scenario)
    for component, role in (("operator", "reconciler"), ("webhook", "webhook")):
        container = release.container(component)
        for name in ("PLUTO_SIDECAR_RESOURCES", "PLUTO_URL", "PLUTO_SIDECAR_IMAGE"):
            monkeypatch.delenv(name, raising=False)
        for entry in container.get("env", []):
            if "value" in entry:
                monkeypatch.setenv(entry["name"], entry["value"])
        settings = settings_from(build_parser().parse_args(container["args"]))
        assert settings.role == role
        if component == "webhook":
            assert settings.sidecar_resources == values["sidecar"]["resources"]
            assert settings.tls_cert_file is not None and settings.tls_key_file is not None
            assert settings.failure_policy == values["webhook"]["failurePolicy"]
