"""Turning what users log into floats, without ever raising into training code."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from pluto.wire import MAX_KEY_LENGTH, MAX_NAME_LENGTH, MAX_TAG_LENGTH, MAX_TAGS


def key_problem(key: str) -> str | None:
    """Why the server could not store ``key`` (None: it can).

    Checked in ``log()`` because a key that fails later fails in the sender thread, where it
    would take the valid points packed into the same chunk down with it.
    """
    if not 0 < len(key) <= MAX_KEY_LENGTH:
        return "a metric key must be 1-256 characters"
    if "\x00" in key:
        # PostgreSQL cannot store a NUL in text: one backend refusing it refuses it everywhere.
        return "a metric key cannot hold a NUL character"
    try:
        key.encode()
    except UnicodeEncodeError:
        # A lone surrogate (e.g. from os.fsdecode of a bad file name) is not UTF-8: the
        # MessagePack encoder raised in the sender thread and the whole chunk was lost.
        return "a metric key must be valid Unicode (it holds a lone surrogate)"
    return None


def finite_time(value: Any) -> float | None:
    """``value`` as a finite float (a timestamp), or None."""
    try:
        result = float(value)
    except Exception:
        return None
    return result if math.isfinite(result) else None


class ValueConverter:
    """Converts logged values; warns once per key about values it must skip."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def convert(self, key: str, value: Any) -> float | None:
        kind = type(value)
        if kind is float:
            return value  # type: ignore[no-any-return]
        if kind is int:
            try:
                return float(value)
            except OverflowError:  # beyond float's range: not a number we can store
                self._skip(key, value, "an int too large for a float")
                return None
        if kind is bool or value is None or isinstance(value, str | bytes):
            self._skip(key, value)
            return None
        # Any attribute access or conversion may run user code that raises anything: a tracker
        # must not crash the training loop, so every step below catches Exception (earlier,
        # an object whose __float__ raised RuntimeError skipped the whole log() call).
        try:
            item = getattr(value, "item", None)  # torch tensors, numpy scalars and arrays
        except Exception as exc:
            self._skip(key, value, f"reading it failed: {exc!r}")
            return None
        if item is not None:
            try:
                if getattr(value, "numel", None) is not None and value.numel() != 1:
                    self._skip(key, value, "a tensor with more than one element")
                    return None
                converted = item()
                kind = type(converted)
                if kind is float or kind is int:
                    return float(converted)
                # numpy.longdouble.item() is itself; any other real number, not a bool
                if isinstance(converted, numbers.Real) and not isinstance(converted, bool):
                    return float(converted)
            except Exception as exc:
                self._skip(key, value, f"reading it failed: {exc!r}")
                return None
            self._skip(key, value)
            return None
        try:
            result = float(value)
        except Exception:
            self._skip(key, value)
            return None
        return result

    def reject_key(self, key: str, why: str = "a metric key must be 1-256 characters") -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"pluto: not logging key {key[:40]!r}...: {why} "
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


# -- run metadata: config, tags, name ------------------------------------------------------

MAX_CONFIG_DEPTH = 64
_INT_RANGE = (-(2**63), 2**64 - 1)  # what MessagePack, the SDK's wire format, can carry


def _text(value: str) -> str:
    """``value`` made encodable: a lone surrogate becomes its ``\\udXXX`` escape."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


def _describe(value: Any) -> str:
    try:
        return _text(str(value))
    except Exception:
        return f"<{type(value).__name__} object>"


class MetadataCleaner:
    """Makes ``init()``'s config, tags and name storable, saying once what it changed.

    ``init(config=...)`` used to raise ``TypeError`` from the encoder for a value JSON has no
    form for (an object, a tensor), ``OverflowError`` for an int beyond 64 bits and
    ``UnicodeEncodeError`` for a lone surrogate; a tag the server refuses (empty, too long, not
    a string) failed the whole ``init()`` with HTTP 422. A tracker must not stop training
    for its metadata: such values are now stored as their text, or dropped, with a warning.
    """

    def __init__(self) -> None:
        self.changes: list[str] = []

    def config(self, config: Any) -> dict[str, Any]:
        try:
            items = list(config.items())
        except Exception as exc:
            self.changes.append(f"config is not a mapping ({exc!r}): ignored")
            return {}
        return {self._key(k, "config"): self._value(v, f"config.{_describe(k)}", 1, set())
                for k, v in items}

    def _key(self, key: Any, where: str) -> str:
        if type(key) is str:
            text = _text(key)
        else:
            text = _describe(key)
            if not isinstance(key, int | float | bool) and key is not None:
                self.changes.append(f"{where}: key {text[:40]!r} ({type(key).__name__}) stored "
                                    "as text")
        return text

    def _value(self, value: Any, where: str, depth: int, seen: set[int]) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if type(value) is str:
            return _text(value)
        if type(value) is int:
            if _INT_RANGE[0] <= value <= _INT_RANGE[1]:
                return value
            self.changes.append(f"{where}: an int beyond 64 bits, stored as text")
            return str(value)
        if type(value) is float:
            if math.isfinite(value):
                return value
            # JSON has no NaN or Infinity: the same strings as metric queries use.
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if depth > MAX_CONFIG_DEPTH:
            self.changes.append(f"{where}: nested deeper than {MAX_CONFIG_DEPTH}, stored as text")
            return _describe(value)[:10_000]
        if id(value) in seen:
            self.changes.append(f"{where}: refers to itself; stored as '<cycle>'")
            return "<cycle>"
        try:
            if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
                inner = seen | {id(value)}
                return {self._key(k, where): self._value(v, f"{where}.{_describe(k)}",
                                                         depth + 1, inner)
                        for k, v in list(value.items())}
            if isinstance(value, list | tuple | set | frozenset):
                inner = seen | {id(value)}
                return [self._value(v, f"{where}[{i}]", depth + 1, inner)
                        for i, v in enumerate(list(value))]
            tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
            if tolist is not None:
                return self._value(tolist(), where, depth + 1, seen | {id(value)})
            if isinstance(value, numbers.Real):  # Fraction, Decimal-like, numpy.longdouble
                return self._value(float(value), where, depth, seen)
            if isinstance(value, str):  # a str subclass
                return _text(str.__str__(value))
        except Exception as exc:
            self.changes.append(f"{where}: reading it failed ({exc!r}); stored as text")
            return _describe(value)
        self.changes.append(f"{where}: {type(value).__name__} stored as its text")
        return _describe(value)

    def tags(self, tags: Any) -> list[str]:
        if isinstance(tags, str):
            raw: list[Any] = [tags]
        else:
            try:
                raw = list(tags)
            except Exception:
                raw = [tags]
        kept: list[str] = []
        for tag in raw:
            text = _text(tag) if type(tag) is str else _describe(tag)
            if not 0 < len(text) <= MAX_TAG_LENGTH:
                self.changes.append(f"tag {text[:40]!r} dropped: a tag is 1-{MAX_TAG_LENGTH} "
                                    "characters")
                continue
            if text not in kept:
                kept.append(text)
        if len(kept) > MAX_TAGS:
            self.changes.append(f"{len(kept) - MAX_TAGS} tags dropped: a run has at most "
                                f"{MAX_TAGS}")
            kept = kept[:MAX_TAGS]
        return kept

    def name(self, name: Any) -> str:
        text = _text(name) if type(name) is str else _describe(name)
        if "\x00" in text:
            # PostgreSQL cannot store a NUL in text: the server failed the whole init().
            self.changes.append("a NUL in the name is stored as U+FFFD")
            text = text.replace("\x00", "\ufffd")
        if len(text) > MAX_NAME_LENGTH:
            self.changes.append(f"the name was cut to {MAX_NAME_LENGTH} characters")
            text = text[:MAX_NAME_LENGTH]
        return text

    def warn(self, stacklevel: int = 3) -> None:
        if not self.changes:
            return
        more = f" (and {len(self.changes) - 3} more)" if len(self.changes) > 3 else ""
        warnings.warn("pluto: run metadata adjusted to what the server can store: "
                      + "; ".join(self.changes[:3]) + more, RuntimeWarning,
                      stacklevel=stacklevel)
