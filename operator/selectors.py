"""Kubernetes label selector semantics, for matching PlutoRun selectors against pod labels."""

from __future__ import annotations

from collections.abc import Mapping

from pluto_operator.model import LabelSelector, LabelSelectorRequirement


def _requirement_holds(req: LabelSelectorRequirement, labels: Mapping[str, str]) -> bool:
    values = req.values or []
    if req.operator == "In":
        return req.key in labels and labels[req.key] in values
    if req.operator == "NotIn":
        # As in apimachinery: a missing label satisfies NotIn.
        return req.key not in labels or labels[req.key] not in values
    if req.operator == "Exists":
        return req.key in labels
    return req.key not in labels  # DoesNotExist


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy ``selector``, as the API server evaluates it.

    ``None`` (no selector) selects nothing; an empty selector selects everything, which is
    Kubernetes' meaning too (a PlutoRun with ``selector: {}`` covers every pod of its namespace).
    """
    if selector is None:
        return False
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    return all(_requirement_holds(req, labels) for req in selector.match_expressions or [])
