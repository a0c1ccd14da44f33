"""The PlutoRun CustomResourceDefinition, generated from the pydantic models.

``crds/plutorun.yaml`` is this module's output, checked in for ``kubectl apply -f crds/``, and so is
its byte-identical copy ``charts/pluto/crds/plutorun.yaml`` (Helm reads CRDs only from inside the
chart); tests fail when either drifts from the models. Regenerate both with::

    python -m pluto_operator.crd \
        --output crds/plutorun.yaml --output charts/pluto/crds/plutorun.yaml

pydantic writes JSON Schema (2020-12); a CRD needs a *structural* OpenAPI v3 schema, so
``openapi_schema`` translates: ``$ref``s are inlined (no ``$defs``), ``Optional`` drops its null
branch (an absent field is how Kubernetes says "unset"), ``const`` becomes a one-value ``enum``,
and ``additionalProperties: false`` is dropped (the API server forbids it; a structural schema
makes it reject unknown fields by itself under Strict field validation). Anything else it cannot
translate faithfully raises ``CRDSchemaError`` instead of producing a CRD that the API server would
refuse or enforce differently from the models.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pluto_operator.model import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    PlutoRun,
)

__all__ = ["CRDSchemaError", "crd_manifest", "crd_yaml", "main", "openapi_schema"]

HEADER = (
    "# Generated from pluto_operator.model by `python -m pluto_operator.crd`: do not edit.\n"
    "# Regenerate: python -m pluto_operator.crd --output crds/plutorun.yaml\n"
    "#   --output charts/pluto/crds/plutorun.yaml\n"
)

PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Pending, Running, Succeeded or Failed"},
    {"name": "Run", "type": "string", "jsonPath": ".status.runId",
     "description": "Run id the pods log into"},
    {"name": "Display", "type": "string", "jsonPath": ".status.displayId",
     "description": "Display id of the run on the server"},
    {"name": "Pods", "type": "integer", "jsonPath": ".status.podsInjected",
     "description": "Pods injected with a sidecar"},
    {"name": "Project", "type": "string", "jsonPath": ".spec.project", "priority": 1,
     "description": "Project of the run"},
    {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1,
     "description": "The run in the Pluto web UI"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)

# The JSON Schema keywords that mean the same in a Kubernetes structural schema.
_PASSED_THROUGH = frozenset({
    "description", "type", "format", "enum", "default", "pattern", "minLength", "maxLength",
    "minimum", "maximum", "multipleOf", "minItems", "maxItems", "minProperties",
    "maxProperties", "required",
})
_DROPPED = frozenset({"title", "$defs", "examples"})
# Order of keys in the generated YAML, so it reads like hand-written CRDs do.
_KEY_ORDER = (
    "description", "type", "format", "enum", "default", "pattern", "minLength", "maxLength",
    "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf", "minItems",
    "maxItems", "minProperties", "maxProperties", "anyOf", "items", "properties",
    "additionalProperties", "required",
)

_ROOT_FIELDS: dict[str, dict[str, Any]] = {
    "apiVersion": {
        "description": "APIVersion defines the versioned schema of this representation of an "
        "object.",
        "type": "string",
    },
    "kind": {
        "description": "Kind is a string value representing the REST resource this object "
        "represents.",
        "type": "string",
    },
    # The API server owns metadata's schema; a CRD may only say that it is an object.
    "metadata": {"type": "object"},
}


class CRDSchemaError(ValueError):
    """The models use a JSON Schema construct that a structural CRD schema cannot express."""


def openapi_schema() -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of PlutoRun, translated from the models."""
    raw = PlutoRun.model_json_schema(by_alias=True, mode="validation")
    # The fields every Kubernetes object has are described the Kubernetes way, not the models'.
    raw["properties"].update(_ROOT_FIELDS)
    return _structural(raw, raw.get("$defs", {}), "PlutoRun")


def crd_manifest() -> dict[str, Any]:
    """The ``apiextensions.k8s.io/v1`` CustomResourceDefinition of PlutoRun."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(column) for column in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """``crd_manifest()`` as the YAML checked in at ``crds/plutorun.yaml``."""
    body = yaml.safe_dump(crd_manifest(), sort_keys=False, default_flow_style=False, width=100)
    return HEADER + body


def _structural(node: Mapping[str, Any], defs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node (and what it contains) to a structural one."""
    merged: dict[str, Any] = {}
    rest = dict(node)

    # A reference, a one-element allOf, or an Optional's anyOf: inline the one real schema and
    # let the node's own keys (the field's description, default) win over the referenced ones.
    target: Mapping[str, Any] | None = None
    if "$ref" in rest:
        name = rest.pop("$ref").removeprefix("#/$defs/")
        target = defs[name]
    if "allOf" in rest:
        all_of = rest.pop("allOf")
        if len(all_of) != 1:
            raise CRDSchemaError(f"{where}: allOf with {len(all_of)} schemas")
        target = all_of[0]
    if "anyOf" in rest:
        branches = [b for b in rest["anyOf"] if b != {"type": "null"}]
        if len(branches) < len(rest["anyOf"]) and rest.get("default", ...) is None:
            del rest["default"]
        if len(branches) == 1:
            del rest["anyOf"]
            target = branches[0]
        elif not rest.get("x-kubernetes-int-or-string"):
            raise CRDSchemaError(f"{where}: a union is structural only as int-or-string")
        else:
            rest["anyOf"] = branches
    if target is not None:
        merged.update(_structural(target, defs, where))

    for key, value in rest.items():
        here = f"{where}.{key}"
        if key in _DROPPED:
            continue
        if key == "description":  # docstrings wrap lines; kubectl explain wraps by itself
            merged[key] = " ".join(value.split())
            continue
        if key in _PASSED_THROUGH or key.startswith("x-kubernetes-"):
            merged[key] = value
        elif key == "anyOf":  # int-or-string: types only, as Kubernetes requires
            merged[key] = [{"type": branch["type"]} for branch in value]
        elif key == "const":
            merged["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema's number form; OpenAPI v3.0 (Kubernetes) has a boolean next to a bound.
            merged[key.replace("exclusiveM", "m")] = value
            merged[key] = True
        elif key == "properties":
            merged[key] = {
                name: _structural(sub, defs, f"{where}.{name}") for name, sub in value.items()
            }
        elif key == "items":
            merged[key] = _structural(value, defs, f"{where}[]")
        elif key == "additionalProperties":
            if value is False:
                continue  # extra="forbid": a structural schema rejects unknown fields itself
            if value is True:
                raise CRDSchemaError(f"{here}: open object; annotate it as FreeForm")
            merged[key] = _structural(value, defs, f"{where}{{}}")
        else:
            raise CRDSchemaError(f"{here}: {key!r} has no structural-schema equivalent")

    if merged.get("default", ...) is None:
        del merged["default"]
    return _ordered(merged)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pluto_operator.crd [--output PATH]...``: print or write the CRD YAML."""
    parser = argparse.ArgumentParser(
        prog="python -m pluto_operator.crd",
        description="Print the PlutoRun CustomResourceDefinition generated from the models.",
    )
    # Repeatable: the CRD lives in crds/ and, as an identical copy, in the Helm chart's crds/.
    parser.add_argument("--output", "-o", type=Path, action="append",
                        help="write to this file instead of stdout (repeat for several files)")
    args = parser.parse_args(argv)
    text = crd_yaml()
    if not args.output:
        sys.stdout.write(text)
    for path in args.output or ():
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
