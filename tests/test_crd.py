"""The PlutoRun CRD and its pydantic model: one source of truth, accepted by Kubernetes.

What these tests pin:

- ``crds/plutorun.yaml`` is exactly what ``pluto_operator.crd`` generates from the models;
- the CRD is a valid ``apiextensions.k8s.io/v1`` object for Kubernetes 1.28 through 1.33, and its
  schema is *structural* (the API server refuses a CRD whose schema is not);
- the API server's view (the CRD schema) and the operator's view (the models) agree: the same
  manifests are accepted and the same ones are rejected, typo'd fields included.

The API server is stood in for by ``jsonschema`` on the CRD's own openAPIV3Schema, adapted the way
the server applies it: unknown fields of a structural schema are an error (server-side field
validation ``Strict``, the default of ``kubectl apply``), ``nullable`` admits null.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pydantic
import pytest
import yaml

from pluto_operator.crd import crd_manifest, crd_yaml, openapi_schema
from pluto_operator.model import (
    PROJECT_NAME_PATTERN,
    RUN_ID_PATTERN,
    ForkSpec,
    ObjectMeta,
    PlutoRun,
    PlutoRunSpec,
    PlutoRunStatus,
)

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "plutorun.yaml"
EXAMPLES_FILE = ROOT / "examples" / "plutorun.yaml"
REGENERATE = "python -m pluto_operator.crd --output crds/plutorun.yaml"
KUBERNETES_VERSIONS = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]


# -- helpers ------------------------------------------------------------------------------------


def as_apiserver_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD structural schema as a JSON Schema validator that acts like the API server."""
    out = dict(node)
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: as_apiserver_jsonschema(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # Strict field validation: unknown field = error
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = as_apiserver_jsonschema(out["additionalProperties"])
    if "items" in out:
        out["items"] = as_apiserver_jsonschema(out["items"])
    return out


SCHEMA = openapi_schema()
APISERVER = jsonschema.Draft202012Validator(as_apiserver_jsonschema(SCHEMA))


def apiserver_errors(manifest: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in APISERVER.iter_errors(manifest)
    ]


def model_errors(manifest: dict[str, Any]) -> list[str]:
    try:
        PlutoRun.model_validate(manifest)
    except pydantic.ValidationError as error:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    return []


def plutorun(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "apiVersion": "pluto.dev/v1alpha1",
        "kind": "PlutoRun",
        "metadata": {"name": "llama-sft", "namespace": "ml"},
        "spec": spec,
    }
    if status is not None:
        manifest["status"] = status
    return manifest


def example_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(EXAMPLES_FILE.read_text()) if doc is not None]


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node that describes a value: the root, fields, map values, array items."""
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")
    if "items" in node:
        yield from schema_nodes(node["items"], f"{path}[]")


CONDITION = {
    "type": "ServerReachable",
    "status": "True",
    "reason": "RunCreated",
    "message": "created run 42 on http://pluto-server.pluto.svc:7300",
    "lastTransitionTime": "2024-05-01T12:00:00Z",
}
FULL_STATUS = {
    "phase": "Running",
    "runId": "llama-sft",
    "serverRunId": 42,
    "displayId": "LF-42",
    "url": "http://pluto.example.com/llama-finetune/runs/LF-42",
    "forkedFrom": 7,
    "forkStep": 1000,
    "podsInjected": 16,
    "conditions": [CONDITION],
    "observedGeneration": 3,
}


# -- the checked-in CRD is the generated one -------------------------------------------------


def test_checked_in_crd_is_generated_from_the_model() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        f"{CRD_FILE.relative_to(ROOT)} is out of date with pluto_operator.model; "
        f"regenerate it: {REGENERATE}"
    )


def test_crd_yaml_is_the_manifest() -> None:
    assert yaml.safe_load(crd_yaml()) == crd_manifest()


def test_cli_prints_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pluto_operator.crd"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert result.stdout == crd_yaml()


def test_cli_writes_the_crd(tmp_path: Path) -> None:
    target = tmp_path / "plutorun.yaml"
    subprocess.run(
        [sys.executable, "-m", "pluto_operator.crd", "--output", str(target)],
        check=True, timeout=60,
    )
    assert target.read_text() == crd_yaml()


# -- Kubernetes accepts the CRD ----------------------------------------------------------------


def test_kubernetes_validate_covers_the_versions_we_support() -> None:
    known = {kubernetes_validate.utils.major_minor(v)
             for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= known


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_is_a_valid_kubernetes_object(version: str) -> None:
    validated = kubernetes_validate.validate(crd_manifest(), version, strict=True)
    assert validated == version  # its own schemas, not those of an older release


def _schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize(
    "break_it",
    [
        lambda crd: crd["spec"]["names"].update(shortName=["prun"]),
        lambda crd: _schema_of(crd)["properties"]["spec"].update(const={}),
        lambda crd: _schema_of(crd).update({"$defs": {}}),
        lambda crd: _schema_of(crd)["properties"]["spec"]["properties"]["fork"]["properties"][
            "step"].update(exclusiveMinimum=0),
    ],
    ids=["typo in names", "const in schema", "$defs in schema", "numeric exclusiveMinimum"],
)
def test_kubernetes_validate_would_catch_a_broken_crd(break_it: Any) -> None:
    # Pins that the check above looks into the schema, rather than passing anything.
    crd = crd_manifest()
    break_it(crd)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, KUBERNETES_VERSIONS[0], strict=True)


def test_crd_names_scope_and_subresources() -> None:
    spec = crd_manifest()["spec"]
    assert crd_manifest()["metadata"]["name"] == "plutoruns.pluto.dev"
    assert spec["group"] == "pluto.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "PlutoRun",
        "listKind": "PlutoRunList",
        "plural": "plutoruns",
        "singular": "plutorun",
        "shortNames": ["prun"],
        "categories": ["pluto"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_kubectl_get_shows_phase_run_display_id_pods_and_age() -> None:
    [version] = crd_manifest()["spec"]["versions"]
    default_columns = [
        (column["name"], column["type"], column["jsonPath"])
        for column in version["additionalPrinterColumns"]
        if column.get("priority", 0) == 0
    ]
    assert default_columns == [
        ("Phase", "string", ".status.phase"),
        ("Run", "string", ".status.runId"),
        ("Display", "string", ".status.displayId"),
        ("Pods", "integer", ".status.podsInjected"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


# -- the schema is structural ------------------------------------------------------------------


def test_schema_nodes_all_have_a_type() -> None:
    untyped = [
        path for path, node in schema_nodes(SCHEMA)
        if not node.get("type")
        and not node.get("x-kubernetes-int-or-string")
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert untyped == []


def test_schema_has_nothing_kubernetes_refuses() -> None:
    refused = {"$ref", "$defs", "definitions", "const", "title", "examples", "allOf", "oneOf",
               "not", "patternProperties", "prefixItems"}
    problems = []
    for path, node in schema_nodes(SCHEMA):
        problems += [f"{path}: {key}" for key in refused & node.keys()]
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false")
        if "additionalProperties" in node and "properties" in node:
            problems.append(f"{path}: both properties and additionalProperties")
        if node.get("uniqueItems"):
            problems.append(f"{path}: uniqueItems")
        # anyOf is allowed only as int-or-string, with nothing but the two types inside.
        if "anyOf" in node and not (
            node.get("x-kubernetes-int-or-string")
            and node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
        ):
            problems.append(f"{path}: anyOf other than int-or-string")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and not isinstance(node[key], bool):
                problems.append(f"{path}: numeric {key} (OpenAPI v3.0 wants a boolean)")
    assert problems == []


def test_only_config_keeps_unknown_fields() -> None:
    preserved = [
        path for path, node in schema_nodes(SCHEMA)
        if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert preserved == [".spec.config"]


def test_metadata_is_left_to_the_api_server() -> None:
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}
    assert SCHEMA["required"] == ["spec"]


def test_schema_defaults_are_valid_and_match_the_model() -> None:
    defaults = {path: node["default"] for path, node in schema_nodes(SCHEMA) if "default" in node}
    assert defaults == {".spec.fork.inheritConfig": True, ".spec.fork.inheritTags": False}
    fork = ForkSpec(runId="llama-sft", step=10)
    assert (fork.inherit_config, fork.inherit_tags) == (True, False)


def test_list_map_keys_are_required_scalars() -> None:
    for path, node in schema_nodes(SCHEMA):
        for key in node.get("x-kubernetes-list-map-keys", []):
            assert key in node["items"]["required"], path
            assert node["items"]["properties"][key]["type"] == "string", path


def test_patterns_are_the_servers() -> None:
    from pluto_server import naming

    assert naming.PROJECT_NAME.pattern == PROJECT_NAME_PATTERN
    assert naming.EXTERNAL_ID.pattern == RUN_ID_PATTERN


# -- the examples ------------------------------------------------------------------------------


def test_examples_hold_a_baseline_and_a_fork() -> None:
    baseline, fork = example_documents()
    assert "fork" not in baseline["spec"]
    assert fork["spec"]["fork"]["runId"] == PlutoRun.model_validate(baseline).run_id


@pytest.mark.parametrize("index", [0, 1], ids=["baseline", "fork"])
def test_example_is_accepted_by_the_api_server_and_the_model(index: int) -> None:
    manifest = example_documents()[index]
    assert apiserver_errors(manifest) == []
    run = PlutoRun.model_validate(manifest)
    assert run.to_dict() == manifest


def test_example_fork_reads_as_expected() -> None:
    run = PlutoRun.model_validate(example_documents()[1])
    assert run.run_id == "llama-sft-lr-1e-4"
    assert run.spec.fork is not None
    assert (run.spec.fork.run_id, run.spec.fork.step) == ("llama-sft", 1000)
    assert run.spec.config == {"lr": 1.0e-4}


# -- the API server and the model agree --------------------------------------------------------

BASE_SPEC: dict[str, Any] = {"project": "llama-finetune"}


def with_(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``spec`` with ``value`` at a dotted ``path`` (intermediate objects created)."""
    out = copy.deepcopy(spec)
    *parents, leaf = path.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return out


ACCEPTED: dict[str, dict[str, Any]] = {
    "only a project": plutorun(BASE_SPEC),
    "explicit run id": plutorun(with_(BASE_SPEC, "runId", "job-7:rank@0+a.b_c")),
    "free-form config, nulls and nesting": plutorun(
        with_(BASE_SPEC, "config", {"lr": None, "layers": [1, {"x": "y"}], "a": {"b": {"c": 1}}})
    ),
    "fork with defaults": plutorun(with_(BASE_SPEC, "fork", {"runId": "base", "step": 0})),
    "selector, both forms": plutorun(with_(BASE_SPEC, "selector", {
        "matchLabels": {"jobset.sigs.k8s.io/jobset-name": "llama"},
        "matchExpressions": [{"key": "parent", "operator": "Exists"},
                             {"key": "tier", "operator": "NotIn", "values": ["a", "b"]}],
    })),
    "quantities as integers and strings": plutorun(with_(BASE_SPEC, "sidecar", {
        "resources": {"requests": {"cpu": 1, "memory": "64Mi"}, "limits": {"cpu": "1.5"}},
        "spoolSize": 1073741824,
        "drainSeconds": 3600,
    })),
    "server only by secret": plutorun(
        with_(BASE_SPEC, "server.apiKeySecretRef", {"name": "pluto-key", "key": "api_key.v1"})
    ),
    "full status": plutorun(BASE_SPEC, FULL_STATUS),
    "condition with an offset": plutorun(BASE_SPEC, {"conditions": [
        {**CONDITION, "lastTransitionTime": "2024-05-01T14:00:00.5+02:00"},
    ]}),
}

REJECTED: dict[str, dict[str, Any]] = {
    "typo in spec (projet)": plutorun({**BASE_SPEC, "projet": "llama-finetune"}),
    "typo in place of a required field": plutorun({"projet": "llama-finetune"}),
    "typo at the top (sepc)": {**plutorun(BASE_SPEC), "sepc": {}},
    "typo in fork (stp)": plutorun(with_(BASE_SPEC, "fork", {"runId": "a", "step": 1, "stp": 2})),
    "typo in sidecar": plutorun(with_(BASE_SPEC, "sidecar.drainSecond", 30)),
    "typo in status": plutorun(BASE_SPEC, {"phse": "Running"}),
    "snake_case name (run_id)": plutorun(with_(BASE_SPEC, "run_id", "x")),
    "no spec": {k: v for k, v in plutorun(BASE_SPEC).items() if k != "spec"},
    "fork without step": plutorun(with_(BASE_SPEC, "fork", {"runId": "base"})),
    "fork without run id": plutorun(with_(BASE_SPEC, "fork", {"step": 3})),
    "negative fork step": plutorun(with_(BASE_SPEC, "fork", {"runId": "base", "step": -1})),
    "fork step as a string": plutorun(with_(BASE_SPEC, "fork", {"runId": "base", "step": "3"})),
    "project with a space": plutorun({"project": "llama finetune"}),
    "project starting with a dash": plutorun({"project": "-llama"}),
    "project of 101 characters": plutorun({"project": "p" * 101}),
    "run id with a slash": plutorun(with_(BASE_SPEC, "runId", "team/run")),
    "run id of 129 characters": plutorun(with_(BASE_SPEC, "runId", "r" * 129)),
    "tags as a string": plutorun(with_(BASE_SPEC, "tags", "sft")),
    "config as a list": plutorun(with_(BASE_SPEC, "config", [1, 2])),
    "selector operator Contains": plutorun(with_(BASE_SPEC, "selector.matchExpressions", [
        {"key": "a", "operator": "Contains", "values": ["b"]}])),
    "selector label value not a string": plutorun(
        with_(BASE_SPEC, "selector.matchLabels", {"a": 1})),
    "drainSeconds 0": plutorun(with_(BASE_SPEC, "sidecar.drainSeconds", 0)),
    "drainSeconds 3601": plutorun(with_(BASE_SPEC, "sidecar.drainSeconds", 3601)),
    "quantity with a space": plutorun(with_(BASE_SPEC, "sidecar.spoolSize", "2 Gi")),
    "quantity in the wrong unit": plutorun(
        with_(BASE_SPEC, "sidecar.resources.limits", {"memory": "2GB"})),
    "secret ref without key": plutorun(
        with_(BASE_SPEC, "server.apiKeySecretRef", {"name": "pluto-key"})),
    "secret name in capitals": plutorun(
        with_(BASE_SPEC, "server.apiKeySecretRef", {"name": "Pluto", "key": "k"})),
    "server url without a scheme": plutorun(with_(BASE_SPEC, "server.url", "pluto:7300")),
    "unknown phase": plutorun(BASE_SPEC, {"phase": "Done"}),
    "condition status Yes": plutorun(BASE_SPEC, {"conditions": [{**CONDITION, "status": "Yes"}]}),
    "condition without reason": plutorun(BASE_SPEC, {"conditions": [
        {k: v for k, v in CONDITION.items() if k != "reason"}]}),
    "negative podsInjected": plutorun(BASE_SPEC, {"podsInjected": -1}),
    "wrong kind": {**plutorun(BASE_SPEC), "kind": "PlutoRuns"},
}
# The API server refuses a wrong kind by the URL it is sent to, not by the schema; the model by
# its literal.
APISERVER_CHECKS_ELSEWHERE = {"wrong kind"}


@pytest.mark.parametrize("manifest", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_by_both(manifest: dict[str, Any]) -> None:
    assert apiserver_errors(manifest) == []
    assert model_errors(manifest) == []


@pytest.mark.parametrize("manifest", REJECTED.values(), ids=REJECTED.keys())
def test_rejected_by_both(request: pytest.FixtureRequest, manifest: dict[str, Any]) -> None:
    name = request.node.callspec.id
    if name not in APISERVER_CHECKS_ELSEWHERE:
        assert apiserver_errors(manifest), "the CRD schema accepted it"
    assert model_errors(manifest), "the model accepted it"


def test_typo_is_reported_by_name() -> None:
    manifest = REJECTED["typo in spec (projet)"]
    assert any("projet" in error for error in apiserver_errors(manifest))
    assert model_errors(manifest) == ["spec.projet: Extra inputs are not permitted"]


def test_fork_without_step_says_so() -> None:
    manifest = REJECTED["fork without step"]
    assert apiserver_errors(manifest) == ["spec.fork: 'step' is a required property"]
    assert model_errors(manifest) == ["spec.fork.step: Field required"]


def test_naive_condition_time_is_rejected_by_the_model() -> None:
    # The API server checks date-time formats itself; jsonschema here only without extras.
    naive = plutorun(BASE_SPEC, {"conditions": [{**CONDITION, "lastTransitionTime":
                                                 "2024-05-01T12:00:00"}]})
    assert model_errors(naive)


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_round_trip_model_dict_model(manifest: dict[str, Any]) -> None:
    run = PlutoRun.model_validate(manifest)
    again = PlutoRun.model_validate(run.to_dict())
    assert again == run
    assert again.to_dict() == run.to_dict()
    assert apiserver_errors(run.to_dict()) == []


def test_dict_of_a_parsed_object_is_the_body_it_came_from() -> None:
    manifest = ACCEPTED["full status"]
    assert PlutoRun.model_validate(manifest).to_dict() == manifest


def test_built_in_python_it_serializes_with_kubernetes_names() -> None:
    run = PlutoRun(
        metadata=ObjectMeta(name="llama-sft-2"),
        spec=PlutoRunSpec(
            project="llama-finetune",
            fork=ForkSpec(runId="llama-sft", step=1000),
        ),
    )
    assert run.to_dict() == {
        "apiVersion": "pluto.dev/v1alpha1",
        "kind": "PlutoRun",
        "metadata": {"name": "llama-sft-2"},
        "spec": {"project": "llama-finetune", "fork": {"runId": "llama-sft", "step": 1000}},
    }
    assert apiserver_errors(run.to_dict()) == []
    assert run.run_id == "llama-sft-2"


def test_status_patch_carries_only_what_was_set() -> None:
    # A merge patch of this must not wipe conditions or any other field it does not name.
    patch = PlutoRunStatus(phase="Running", podsInjected=4).to_dict()
    assert patch == {"phase": "Running", "podsInjected": 4}


def test_run_id_defaults_to_the_name() -> None:
    run = PlutoRun.model_validate(plutorun(BASE_SPEC))
    assert run.spec.run_id is None
    assert run.run_id == "llama-sft"
    explicit = PlutoRun.model_validate(plutorun(with_(BASE_SPEC, "runId", "custom")))
    assert explicit.run_id == "custom"


def test_run_id_from_a_name_too_long_says_to_set_it() -> None:
    manifest = plutorun(BASE_SPEC)
    manifest["metadata"]["name"] = "n" * 200  # a valid Kubernetes name, too long for a run id
    run = PlutoRun.model_validate(manifest)
    with pytest.raises(ValueError, match=re.escape("set spec.runId")):
        _ = run.run_id


def test_metadata_keeps_what_the_api_server_adds() -> None:
    manifest = plutorun(BASE_SPEC)
    manifest["metadata"].update({
        "uid": "2f4c", "generation": 3, "resourceVersion": "991",
        "creationTimestamp": "2024-05-01T12:00:00Z",
        "managedFields": [{"manager": "kubectl", "operation": "Update"}],
    })
    run = PlutoRun.model_validate(manifest)
    assert run.metadata.generation == 3
    assert run.to_dict() == manifest


# -- a run's identity cannot be edited ----------------------------------------------------------


def test_identity_fields_refuse_changes_at_the_api_server() -> None:
    """project, runId and fork carry a CEL transition rule (``self == oldSelf``): an edit that
    would split the pods of one job across two runs is refused, not just warned about."""
    ruled = {path: node["x-kubernetes-validations"] for path, node in schema_nodes(SCHEMA)
             if "x-kubernetes-validations" in node}
    assert set(ruled) == {".spec.project", ".spec.runId", ".spec.fork"}
    for path, rules in ruled.items():
        [rule] = rules
        assert rule["rule"] == "self == oldSelf"
        assert f"{path.removeprefix('.')} cannot change" in rule["message"]
        assert "create a new PlutoRun" in rule["message"]
    # What the API server's CRD validation requires of a rule (apiextensions v1 ValidationRule).
    crd = crd_manifest()
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(crd, version, strict=True)  # raises when invalid


def test_status_records_the_opened_runs_project() -> None:
    status = PlutoRunStatus.model_validate({"runId": "sft", "project": "llama-finetune"})
    assert status.project == "llama-finetune"
    assert model_errors(plutorun({"project": "p"}, {"project": "not a project"}))
    assert apiserver_errors(plutorun({"project": "p"}, {"project": "not a project"}))
