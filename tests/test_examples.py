"""The manifests in examples/ are ones a cluster accepts, and they do what their comments say.

What these tests pin:

- every Kubernetes object in ``examples/*.yaml`` (and ``crds/plutorun.yaml``) validates against
  the API server's OpenAPI schemas of Kubernetes 1.28 to 1.33 (kubernetes-validate, strict:
  unknown fields are errors). Custom kinds, which those schemas do not know:
  PlutoRun against ``crds/plutorun.yaml``'s openAPIV3Schema (jsonschema, unknown fields are
  errors as under server-side field validation) and ``PlutoRun.model_validate``; JobSet through
  its embedded Job and pod templates (as ``batch/v1`` Job and ``v1`` PodTemplate) plus its own
  fields against the JobSet API's field names, since no JobSet schema is installed;
- ``examples/konduktor-task.yaml`` validates against Konduktor's own task and resources schemas
  (``konduktor/utils/schemas.py``, loaded from its file: the ``konduktor`` package itself does
  not import without its dependencies, see ``konduktor_schemas``);
- the DDP wiring: torchrun's own parser, fed the arguments as the kubelet expands them for each
  completion index, sees 2 nodes, node rank = completion index, and a rendezvous endpoint that
  is the DNS name of the pod of index 0 (hostname + subdomain, served by the headless Service);
- each example's pods are covered by the route its comments name, decided by the webhook's own
  ``pluto_operator.targets.decide``: a pod label (Job), a PlutoRun selector (JobSet), the
  namespace label (Konduktor, run id = the PLUTO_RUN_ID Konduktor set).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import torch.distributed.run as torchrun
import yaml
from support import pod_specs
from support.pod_specs import env_of

from pluto_operator.model import PlutoRun
from pluto_operator.settings import OperatorSettings
from pluto_operator.targets import KnownRun, NamespaceInfo, decide

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CRD_FILE = ROOT / "crds" / "plutorun.yaml"
KONDUKTOR_TASK = EXAMPLES / "konduktor-task.yaml"
README = EXAMPLES / "README.md"
KUBERNETES_VERSIONS = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]

#: Kinds the Kubernetes OpenAPI schemas describe (kubernetes-validate knows them).
BUILTIN_KINDS = {"Service", "Job", "CustomResourceDefinition"}

# JobSet (jobset.x-k8s.io/v1alpha2) field names, from the Go types of kubernetes-sigs/jobset
# (api/jobset/v1alpha2/jobset_types.go): a typo in examples/jobset.yaml would be dropped or
# refused by the API server, so it is refused here.
JOBSET_SPEC_FIELDS = {
    "replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
    "coordinator", "managedBy", "ttlSecondsAfterFinished", "volumeClaimPolicies",
}
JOBSET_REPLICATED_JOB_FIELDS = {"name", "groupName", "template", "replicas", "dependsOn"}
JOBSET_NETWORK_FIELDS = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
JOBSET_FAILURE_POLICY_FIELDS = {"maxRestarts", "restartStrategy", "rules"}
# RFC 1035 label: JobSet's webhook requires it of the names of the Jobs and pods it creates.
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# -- reading the examples -------------------------------------------------------------------------


def kubernetes_files() -> list[Path]:
    """Every YAML file in examples/ that holds Kubernetes objects (all but the Konduktor task)."""
    return sorted(p for p in EXAMPLES.glob("*.yaml") if p != KONDUKTOR_TASK)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    """(id, object) for every document of every manifest file, the CRD included."""
    found = []
    for path in [*kubernetes_files(), CRD_FILE]:
        for i, doc in enumerate(documents(path)):
            found.append((f"{path.relative_to(ROOT)}[{i}]:{doc.get('kind')}", doc))
    return found


def objects_of(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(ident, doc) for ident, doc in all_objects() if doc.get("kind") == kind]


def the(path: Path, kind: str) -> dict[str, Any]:
    found = [doc for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def k8s_errors(obj: Mapping[str, Any], version: str) -> list[str]:
    """kubernetes-validate's verdict as short lines (its exceptions print whole schemas)."""
    try:
        validated = kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path) or "<root>"
        return [f"{path}: {error.message}"]
    assert validated == version, f"validated against {validated}, not {version}"
    return []


# -- every object is valid ------------------------------------------------------------------------


def test_every_example_file_is_checked() -> None:
    # A new example file must hold Kubernetes objects of a kind checked below (or be the
    # Konduktor task); nothing in examples/ escapes validation.
    checked = BUILTIN_KINDS | {"PlutoRun", "JobSet"}
    for ident, doc in all_objects():
        assert doc.get("apiVersion") and doc.get("kind"), f"{ident}: not a Kubernetes object"
        assert doc["kind"] in checked, f"{ident}: no validation for kind {doc['kind']}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "ident", [ident for ident, doc in all_objects() if doc["kind"] in BUILTIN_KINDS]
)
def test_builtin_objects_are_valid(ident: str, version: str) -> None:
    obj = dict(all_objects())[ident]
    assert k8s_errors(obj, version) == []


def test_kubernetes_validate_catches_a_typo() -> None:
    # Pins that the check above looks into nested fields (strict mode), rather than passing.
    job = the(EXAMPLES / "job.yaml", "Job")
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert k8s_errors(job, "1.33") == [
        "spec.template.spec.containers.0: Additional properties are not allowed "
        "('volumeMount' was unexpected)"
    ]


def as_apiserver_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD structural schema as the API server applies it: ``nullable`` admits null and,
    with server-side field validation Strict (kubectl's default), unknown fields are errors."""
    out = dict(node)
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: as_apiserver_jsonschema(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = as_apiserver_jsonschema(out["additionalProperties"])
    if "items" in out:
        out["items"] = as_apiserver_jsonschema(out["items"])
    return out


def plutorun_validator() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft202012Validator(
        as_apiserver_jsonschema(version["schema"]["openAPIV3Schema"])
    )


@pytest.mark.parametrize("ident", [ident for ident, _ in objects_of("PlutoRun")])
def test_plutoruns_are_valid(ident: str) -> None:
    obj = dict(all_objects())[ident]
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in plutorun_validator().iter_errors(obj)]
    assert errors == []
    parsed = PlutoRun.model_validate(obj)
    assert parsed.run_id  # a usable run id: spec.runId or the name


def test_plutorun_schema_catches_a_typo() -> None:
    run = the(EXAMPLES / "job.yaml", "PlutoRun")
    run["spec"]["runID"] = "x"
    assert [e.message for e in plutorun_validator().iter_errors(run)] == [
        "Additional properties are not allowed ('runID' was unexpected)"
    ]


def test_every_example_names_a_plutorun() -> None:
    assert {doc["metadata"]["name"] for _, doc in objects_of("PlutoRun")} >= {
        "ddp-job", "ddp-jobset", "llama-sft", "llama-sft-lr-sweep",
    }


def jobset_templates(jobset: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each replicated job's template as the Job and the PodTemplate objects it amounts to."""
    name = jobset["metadata"]["name"]
    for rjob in jobset["spec"]["replicatedJobs"]:
        job_template = rjob["template"]
        yield f"{rjob['name']}:Job", {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {**job_template.get("metadata", {}), "name": f"{name}-{rjob['name']}-0"},
            "spec": job_template["spec"],
        }
        yield f"{rjob['name']}:PodTemplate", {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{name}-{rjob['name']}"},
            "template": job_template["spec"]["template"],
        }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("ident", [ident for ident, _ in objects_of("JobSet")])
def test_jobset_templates_are_valid(ident: str, version: str) -> None:
    jobset = dict(all_objects())[ident]
    for part, obj in jobset_templates(jobset):
        assert k8s_errors(obj, version) == [], part


@pytest.mark.parametrize("ident", [ident for ident, _ in objects_of("JobSet")])
def test_jobset_fields_are_jobset_api_fields(ident: str) -> None:
    jobset = dict(all_objects())[ident]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    spec = jobset["spec"]
    assert set(spec) <= JOBSET_SPEC_FIELDS
    assert set(spec.get("network", {})) <= JOBSET_NETWORK_FIELDS
    assert set(spec.get("failurePolicy", {})) <= JOBSET_FAILURE_POLICY_FIELDS
    for rjob in spec["replicatedJobs"]:
        assert set(rjob) <= JOBSET_REPLICATED_JOB_FIELDS
        # The names JobSet derives must be DNS labels (its webhook refuses the JobSet otherwise).
        completions = rjob["template"]["spec"]["completions"]
        longest_pod = f"{jobset['metadata']['name']}-{rjob['name']}-{rjob.get('replicas', 1) - 1}"
        longest_pod += f"-{completions - 1}-abcde"  # + the generated suffix
        assert DNS_1035_LABEL.match(longest_pod) and len(longest_pod) <= 63, longest_pod


# -- the Konduktor task ----------------------------------------------------------------------------


def konduktor_schemas() -> ModuleType:
    """``konduktor/utils/schemas.py`` loaded from its file.

    ``get_task_schema()`` builds the schema of its ``experimental.config_overrides`` key from
    ``get_config_schema()``, which imports konduktor's storage registry (cloud SDKs that
    konduktor-nightly was installed without). That one builder is replaced with an empty set of
    properties, so the task schema is Konduktor's with no ``experimental`` key: stricter than
    Konduktor (the task's ``additionalProperties: false`` then refuses an ``experimental`` key),
    never laxer. ``get_resources_schema()`` needs nothing and is used as it is.
    """
    spec = importlib.util.find_spec("konduktor")
    assert spec is not None and spec.submodule_search_locations, "konduktor-nightly missing"
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "schemas.py"
    file_spec = importlib.util.spec_from_file_location("_konduktor_schemas", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    module._experimental_task_schema = dict  # type: ignore[attr-defined]
    return module


def konduktor_validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    # Konduktor's SchemaValidator is Draft 7 plus a case-insensitive enum keyword, which only
    # its storage and config schemas use.
    assert "case_insensitive_enum" not in str(schema)
    return jsonschema.Draft7Validator(schema)


def konduktor_errors(task: Mapping[str, Any]) -> list[str]:
    schemas = konduktor_schemas()
    errors = [e.message for e in konduktor_validator(schemas.get_task_schema()).iter_errors(task)]
    resources = task.get("resources", {})
    validator = konduktor_validator(schemas.get_resources_schema())
    errors += [f"resources: {e.message}" for e in validator.iter_errors(resources)]
    return errors


def test_konduktor_task_is_valid_for_konduktor() -> None:
    task = pod_specs.konduktor_task()
    assert "experimental" not in task
    assert konduktor_errors(task) == []
    # What konduktor launch requires beyond the schema (Task, Resources, create_pod_spec).
    assert isinstance(task["num_nodes"], int) and task["num_nodes"] >= 2
    for key in ("cpus", "memory", "image_id"):
        assert task["resources"].get(key), key


def test_konduktor_schema_catches_a_typo() -> None:
    task = pod_specs.konduktor_task()
    task["num_node"] = 2
    task["resources"]["gpus"] = "H100:8"
    assert konduktor_errors(task) == [
        "Additional properties are not allowed ('num_node' was unexpected)",
        "resources: Additional properties are not allowed ('gpus' was unexpected)",
    ]


def test_konduktor_run_uses_what_konduktor_sets() -> None:
    # Every variable the task's `run` reads is one Konduktor's pod template defines.
    task = pod_specs.konduktor_task()
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", task["run"]))
    assert used == {"NUM_NODES", "NUM_GPUS_PER_NODE", "RANK", "MASTER_ADDR"}
    assert used <= set(env_of(pod_specs.konduktor_pod()))


def test_konduktor_jobset_names_are_dns_labels() -> None:
    jobset = pod_specs.konduktor_jobset()
    name = jobset["metadata"]["name"]
    nodes = pod_specs.konduktor_task()["num_nodes"]
    longest_pod = f"{name}-workers-0-{nodes - 1}-abcde"
    assert DNS_1035_LABEL.match(longest_pod) and len(longest_pod) <= 63, longest_pod


# -- torchrun wiring ----------------------------------------------------------------------------


def kubelet_expand(arg: str, env: Mapping[str, str]) -> str:
    """$(VAR) references in command/args, as the kubelet expands them: defined variables are
    replaced, undefined ones stay as written, $$ is a literal $."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, arg)


def torchrun_config(pod: Mapping[str, Any], index: int) -> tuple[Any, list[str]]:
    """torchrun's launch config for the pod's first container, completion index ``index``."""
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    env = {"JOB_COMPLETION_INDEX": str(index)}  # what the field reference resolves to
    args = [kubelet_expand(a, env) for a in container["args"]]
    config, _, script_args = torchrun.config_from_args(torchrun.get_args_parser().parse_args(args))
    return config, script_args


@pytest.mark.parametrize(
    ("build", "kind"),
    [(pod_specs.indexed_job_pod, "Job"), (pod_specs.jobset_pod, "JobSet")],
    ids=["job.yaml", "jobset.yaml"],
)
def test_torchrun_uses_two_nodes_ranked_by_completion_index(build: Any, kind: str) -> None:
    rank0 = build(0)
    rendezvous_host = f"{rank0['spec']['hostname']}.{rank0['spec']['subdomain']}"
    for index in (0, 1):
        pod = build(index)
        # The Job controller gives the container the variable the args refer to.
        assert env_of(pod)["JOB_COMPLETION_INDEX"] == {
            "fieldRef": {"apiVersion": "v1",
                         "fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}
        }
        assert pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == str(index)
        config, script_args = torchrun_config(pod, index)
        assert (config.min_nodes, config.max_nodes) == (2, 2)
        assert config.rdzv_backend == "static"
        assert config.rdzv_configs["rank"] == index  # node rank = completion index
        host, port = config.rdzv_endpoint.rsplit(":", 1)
        assert host == rendezvous_host  # the pod of index 0, by its DNS name
        ports = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]]
        assert int(port) in ports
        # torchrun runs `python -u <script> <args>` in each worker process.
        assert script_args[-2:] == ["/workspace/train.py", "--steps=200"]


def test_job_runs_two_pods_at_once() -> None:
    job = the(EXAMPLES / "job.yaml", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert "--nnodes=2" in args and "--node-rank=$(JOB_COMPLETION_INDEX)" in args


def test_job_headless_service_resolves_the_pods() -> None:
    service = the(EXAMPLES / "job.yaml", "Service")
    pod = pod_specs.indexed_job_pod(1)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # A pod gets <hostname>.<subdomain> only from a headless Service named like its subdomain.
    assert service["metadata"]["name"] == pod["spec"]["subdomain"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert {p["port"] for p in service["spec"]["ports"]} == {
        p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]
    }


def test_jobset_runs_two_pods_at_once_with_dns_names() -> None:
    jobset = the(EXAMPLES / "jobset.yaml", "JobSet")
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    (rjob,) = jobset["spec"]["replicatedJobs"]
    assert rjob["template"]["spec"]["completions"] == rjob["template"]["spec"]["parallelism"] == 2


def test_examples_run_the_script_the_image_holds() -> None:
    # The README's training image copies train.py to /workspace/train.py.
    assert "COPY train.py /workspace/train.py" in README.read_text()
    assert "/workspace/train.py" in pod_specs.konduktor_task()["run"]
    assert (EXAMPLES / "train.py").is_file()


# -- each example is covered by the route it describes ------------------------------------------


def known_runs(path: Path, namespace: str) -> list[KnownRun]:
    return [
        KnownRun(doc["metadata"]["name"], namespace, "2024-05-01T12:00:00Z",
                 PlutoRun.model_validate(doc))
        for doc in documents(path) if doc["kind"] == "PlutoRun"
    ]


def test_job_pods_log_into_their_plutorun_by_label() -> None:
    pod = pod_specs.indexed_job_pod(0)
    decision = decide(pod, "ml", NamespaceInfo(), known_runs(EXAMPLES / "job.yaml", "ml"),
                      OperatorSettings())
    assert decision.binding is not None, decision.warnings
    assert (decision.binding.route, decision.binding.run_id) == ("label", "ddp-job")
    assert decision.binding.project == "ddp-examples"


def test_jobset_pods_log_into_their_plutorun_by_selector() -> None:
    pod = pod_specs.jobset_pod(1)
    decision = decide(pod, "ml", NamespaceInfo(), known_runs(EXAMPLES / "jobset.yaml", "ml"),
                      OperatorSettings())
    assert decision.binding is not None, decision.warnings
    assert (decision.binding.route, decision.binding.run_id) == ("selector", "ddp-jobset")


def test_konduktor_pods_log_into_the_run_konduktor_names() -> None:
    pod = pod_specs.konduktor_pod(rank=1)
    namespace = NamespaceInfo(labels={"pluto.dev/inject": "enabled"},
                              annotations={"pluto.dev/project": "ddp-examples"})
    decision = decide(pod, "ml", namespace, [], OperatorSettings())
    assert decision.binding is not None
    assert decision.binding.route == "namespace"
    assert decision.binding.project == "ddp-examples"
    # The run id of the operator's PlutoRun is the one Konduktor already gave the container:
    # the job name, which is the task name with Konduktor's suffix.
    assert decision.binding.run_id == env_of(pod)["PLUTO_RUN_ID"] == "pluto-ddp-3f9a"
    # Without the namespace label nothing covers them.
    assert decide(pod, "ml", NamespaceInfo(), [], OperatorSettings()).binding is None


# -- the README ---------------------------------------------------------------------------------


def test_readme_covers_every_example() -> None:
    text = README.read_text()
    for path in EXAMPLES.iterdir():
        if path.is_file() and path.name != "README.md" and not path.name.startswith("."):
            assert f"examples/{path.name}" in text, path.name
