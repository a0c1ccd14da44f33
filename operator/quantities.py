"""Kubernetes resource quantities (``2Gi``, ``500m``, ``1e9``) read as numbers."""

from __future__ import annotations

import re

_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
                   "E": 10**18, "m": 10**-3}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def quantity_value(quantity: int | float | str) -> float:
    """A Kubernetes quantity as a number: ``2Gi`` and ``500M`` in bytes, ``250m`` of a CPU
    as 0.25, ``1e9`` as it reads."""
    if isinstance(quantity, int | float):
        return float(quantity)
    match = _QUANTITY.match(quantity.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    number, suffix = match.groups()
    factor = _BINARY_SUFFIX.get(suffix) or _DECIMAL_SUFFIX.get(suffix)
    if factor is None:
        raise ValueError(f"unknown quantity suffix {suffix!r} in {quantity!r}")
    return float(number) * factor
