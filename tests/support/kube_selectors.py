"""Label and field selectors, parsed and matched as the API server does for LIST and WATCH.

Separate from :mod:`support.kube_apiserver` because it holds no server state: plain functions
of a selector string and an object, which the server applies to LIST, WATCH and
deletecollection alike. Field selectors accept any dotted path here; the real API server
accepts only the few fields it indexes for each resource, so a test passing here with an
unusual field would not pass against a cluster.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import kmock

__all__ = [
    "Requirement",
    "Selection",
    "labels_match",
    "parse_field_selector",
    "parse_label_selector",
]

_LABEL_REQUIREMENT = re.compile(
    r"(?P<key>[^\s!=,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,()]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?"
)
_FIELD_REQUIREMENT = re.compile(r"(?P<key>[^\s!=,]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s,]*)")


def _split_top_level(text: str) -> list[str]:
    """Split a selector on the commas outside ``( )``."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


Requirement = tuple[str, str, frozenset[str]]


def parse_label_selector(selector: str) -> list[Requirement]:
    """``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``; ANDed."""
    requirements: list[Requirement] = []
    for part in _split_top_level(selector):
        if part.startswith("!"):
            requirements.append((part[1:].strip(), "!", frozenset()))
            continue
        match = _LABEL_REQUIREMENT.fullmatch(part)
        if match is None:
            raise ValueError(f"unable to parse requirement: {part!r}")
        if match["op"]:
            requirements.append((match["key"], match["op"], frozenset({match["value"]})))
        elif match["set"]:
            values = frozenset(v.strip() for v in match["values"].split(","))
            requirements.append((match["key"], match["set"], values))
        else:
            requirements.append((match["key"], "exists", frozenset()))
    return requirements


def labels_match(requirements: Sequence[Requirement], labels: Mapping[str, str]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
        if op in ("=", "==", "in") and (not present or labels[key] not in values):
            return False
        if op in ("!=", "notin") and present and labels[key] in values:
            return False
    return True


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for step in path.split("."):
        value = value.get(step) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def parse_field_selector(selector: str) -> list[tuple[str, str, str]]:
    """``metadata.name=x``, ``status.phase!=Running``, ...; any dotted path, ANDed."""
    requirements = []
    for part in _split_top_level(selector):
        match = _FIELD_REQUIREMENT.fullmatch(part)
        if match is None:
            raise ValueError(f"invalid field selector: {part!r}")
        requirements.append((match["key"], match["op"], match["value"]))
    return requirements


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a LIST or WATCH request selects."""

    resource: kmock.resource
    namespace: str | None
    name: str | None
    labels: list[Requirement]
    fields: list[tuple[str, str, str]]

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        for path, op, value in self.fields:
            if (_field_value(obj, path) == value) != (op in ("=", "==")):
                return False
        return labels_match(self.labels, meta.get("labels") or {})
