"""The one inheritance rule for forks.

Config: the parent's config deep-merged with the child's, the child's keys
winning; nested mappings merge key by key, anything else (lists included) is
replaced whole. Tags: the parent's tags, then the child's, deduplicated,
first occurrence kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def union_tags(*groups: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(tag for group in groups for tag in group))
