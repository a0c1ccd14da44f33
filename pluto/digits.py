"""Whole numbers written as plain ASCII digits (run ids, ranks, sizes, segment names)."""

from __future__ import annotations


def parse_digits(text: str | None) -> int | None:
    """The value of ``text`` when it is one or more ASCII digits (``"42"``), else None.

    ``str.isdigit()`` alone is not enough: it is true for ``"¹"`` or ``"①"``, which ``int()``
    refuses with a ValueError, so a check on it let such text through to a crash.
    """
    if text and text.isascii() and text.isdigit():
        return int(text)
    return None
