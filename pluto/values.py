"""Turning what users log into floats, without ever raising into training code."""

from __future__ import annotations

import warnings
from typing import Any


class ValueConverter:
    """Converts logged values; warns once per key about values it must skip."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def convert(self, key: str, value: Any) -> float | None:
        kind = type(value)
        if kind is float or kind is int:
            return float(value)
        if kind is bool or value is None or isinstance(value, str | bytes):
            self._skip(key, value)
            return None
        item = getattr(value, "item", None)  # torch tensors, numpy scalars and 0-d arrays
        if item is not None:
            try:
                if getattr(value, "numel", None) is not None and value.numel() != 1:
                    self._skip(key, value, "a tensor with more than one element")
                    return None
                converted = item()
            except Exception as exc:  # a tracker must not crash the training loop
                self._skip(key, value, f"reading it failed: {exc}")
                return None
            if type(converted) in (float, int):
                return float(converted)
            self._skip(key, value)
            return None
        try:
            result = float(value)
        except (TypeError, ValueError, OverflowError):
            self._skip(key, value)
            return None
        return result

    def reject_key(self, key: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"pluto: not logging key {key[:40]!r}...: a metric key must be 1-256 characters "
            "(this warning is shown once per key)", RuntimeWarning, stacklevel=4,
        )

    def _skip(self, key: str, value: Any, why: str | None = None) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        reason = why or f"{type(value).__name__} is not a number"
        warnings.warn(
            f"pluto: not logging {key!r}: {reason}; log int, float, a one-element tensor "
            "or a numpy scalar (this warning is shown once per key)",
            RuntimeWarning,
            stacklevel=4,
        )
