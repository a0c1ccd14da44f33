"""``parse_digits``: the one place text becomes a run id, rank, size or segment number."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pluto.digits import parse_digits


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("42", 42), ("007", 7)])
def test_ascii_digits_are_their_value(text: str, value: int) -> None:
    assert parse_digits(text) == value


@pytest.mark.parametrize("text", [None, "", " 1", "1 ", "-1", "+1", "1_0", "1.0", "\u00b9",
                                  "\u2460", "\u0663", "1\u00b2"])
def test_anything_else_is_none(text: str | None) -> None:
    assert parse_digits(text) is None


@given(st.text() | st.from_regex(r"\A[0-9]+\Z"))
def test_never_raises_and_accepts_exactly_ascii_digits(text: str) -> None:
    value = parse_digits(text)
    if text and all("0" <= char <= "9" for char in text):
        assert value == int(text)
    else:
        assert value is None
