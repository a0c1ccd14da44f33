"""Point columns read from MessagePack by numpy (``pluto_server.columns``) against msgspec.

The fast path reads an array as a fixed-stride byte table when every element has the same
encoding, and hands anything else to msgspec. Whatever the encoding, the arrays must be the
ones that decoding the body into ``Chunk`` lists and converting them gives, and a column
that is not an array of numbers must be refused with the path msgspec would have named.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pluto.wire import Chunk, IngestBatch
from pluto_server.columns import PackedIngestBatch, points
from pluto_server.errors import Unprocessable

#: Integers of every MessagePack width, negative ones and ones past int64 included.
INTEGERS = st.one_of(
    st.integers(0, 127), st.integers(128, 255), st.integers(256, 65535),
    st.integers(65536, 2**32 - 1), st.integers(2**32, 2**63 - 1),
    st.integers(2**63, 2**64 - 1), st.integers(-(2**63), -1),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
#: One width throughout (the fast path) or any mixture (msgspec's path).
UNIFORM_INTEGERS = st.sampled_from([
    st.integers(0, 127), st.integers(128, 255), st.integers(256, 65535),
    st.integers(65536, 2**32 - 1), st.integers(2**32, 2**63 - 1), st.integers(2**63, 2**64 - 1),
]).flatmap(lambda width: st.lists(width, max_size=40))
INTEGER_LISTS = st.one_of(UNIFORM_INTEGERS, st.lists(INTEGERS, max_size=40))
#: Floats, or floats with integers among them (msgspec takes an int for a float).
VALUE_LISTS = st.one_of(st.lists(FLOATS, max_size=40),
                        st.lists(st.one_of(FLOATS, st.integers(-(2**53), 2**53)), max_size=40))


def packed(chunk: Chunk) -> PackedIngestBatch:
    body = msgspec.msgpack.encode(IngestBatch(chunks=[chunk]))
    return msgspec.msgpack.decode(body, type=PackedIngestBatch)


def expected_integers(numbers: list[int]) -> list[int]:
    """What ingest stores for a step or key index: the number, or -1 (refused) beyond int64."""
    if any(not -(2**63) <= n < 2**63 for n in numbers):
        return [-1] * len(numbers)
    return numbers


def same_floats(got: np.ndarray, want: list[float]) -> bool:
    return len(got) == len(want) and all(
        (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
        for a, b in zip(got.tolist(), [float(w) for w in want], strict=True))


@settings(max_examples=300, deadline=None)
@given(steps=INTEGER_LISTS, key_index=INTEGER_LISTS, values=VALUE_LISTS, times=VALUE_LISTS)
def test_the_packed_columns_are_what_decoding_into_lists_gives(
        steps: list[int], key_index: list[int], values: list[float], times: list[float]) -> None:
    chunk = Chunk(run=1, session="s", seq=0, writer=0, keys=["k"], key_index=key_index,
                  steps=steps, values=values, times=times)
    (from_bytes,) = packed(chunk).chunks
    got = points(from_bytes, "$.chunks[0]")
    want = points(chunk, "$.chunks[0]")
    assert got.steps.tolist() == want.steps.tolist() == expected_integers(steps)
    assert got.key_index.tolist() == want.key_index.tolist() == expected_integers(key_index)
    assert same_floats(got.values, values) and same_floats(want.values, values)
    assert same_floats(got.times, times) and same_floats(want.times, times)
    for column in (got.steps, got.key_index, got.values, got.times):
        assert column.dtype.byteorder in "<=" and column.flags.c_contiguous


def test_long_uniform_columns_take_the_fast_path_and_come_out_right() -> None:
    """Arrays past 65,535 elements (a 5-byte array header), one width each."""
    n = 70_000
    steps = list(range(70_000, 70_000 + n))  # all uint32
    chunk = Chunk(run=1, session="s", seq=0, writer=0, keys=["a", "b"],
                  key_index=[0, 1] * (n // 2), steps=steps, values=[i / 3 for i in range(n)],
                  times=[1.7e9 + i for i in range(n)])
    (from_bytes,) = packed(chunk).chunks
    got = points(from_bytes, "$.chunks[0]")
    assert got.steps.tolist() == steps
    assert got.key_index.tolist() == [0, 1] * (n // 2)
    assert got.values.tolist() == [i / 3 for i in range(n)]
    assert got.times.tolist() == [1.7e9 + i for i in range(n)]


@pytest.mark.parametrize(
    ("field", "value", "phrases"),
    [
        ("values", [1.0, "x", 2.0], ("Expected `float`, got `str`", "$.chunks[0].values[1]")),
        ("steps", [0, 1.5], ("Expected `int`, got `float`", "$.chunks[0].steps[1]")),
        ("key_index", "abc", ("Expected `array`, got `str`", "$.chunks[0].key_index")),
        ("times", {"a": 1}, ("Expected `array`, got `object`", "$.chunks[0].times")),
    ],
)
def test_a_column_that_is_not_an_array_of_numbers_is_named_in_the_error(
        field: str, value: object, phrases: tuple[str, ...]) -> None:
    body = {"chunks": [{"run": 1, "session": "s", "seq": 0, "writer": 0, "keys": ["k"],
                        "key_index": [0, 0, 0], "steps": [0, 1, 2], "values": [0.0, 1.0, 2.0],
                        "times": [0.0, 0.0, 0.0], field: value}]}
    (chunk,) = msgspec.msgpack.decode(msgspec.msgpack.encode(body), type=PackedIngestBatch).chunks
    with pytest.raises(Unprocessable) as caught:
        points(chunk, "$.chunks[0]")
    for phrase in ("invalid IngestBatch", *phrases):
        assert phrase in str(caught.value)
