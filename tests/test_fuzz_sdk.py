"""Hypothesis on the SDK's inputs, against a real server on SQLite and PostgreSQL.

``Run.log()`` gets arbitrary keys (any text, lone surrogates and NUL included, huge ones,
objects that are not strings, objects whose ``__str__`` raises), values (ints of any size,
floats with NaN and infinities, numpy scalars and 0-d arrays, torch tensors, bools, None,
text, objects that raise), steps (negative, past 2**63, floats, bools) and timestamps;
``init()``, ``update_config()`` and ``add_tags()`` get arbitrary config, tags and names.

The properties: nothing ever raises into the caller, and every point that is valid (a key of
1-256 characters of valid Unicode without NUL, a value that is a real number, a step in
0..2**63-1) arrives at the server exactly once with its value, step and timestamp;
everything else is skipped. Each strategy draws an input together with what it must become,
so the expectation is written down here, not derived from the SDK's code.

The examples of one test share one run (no run per example), so a test takes seconds; the
server is asked once, at the end, for everything. A NUL in a metric key or a chunk's session
is also refused by the server itself (422, so a sidecar dead-letters it instead of retrying
a 500 for ever).
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server_process import ServerProcess

import pluto
from pluto import query
from pluto.wire import Chunk, IngestBatch, LogLine

pytestmark = pytest.mark.usefixtures("sdk_env")

FAST: dict[str, Any] = {"console": False, "flush_interval": 0.05, "init_timeout": 10,
                        "finish_timeout": 30}
FUZZ = settings(max_examples=80, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
SKIP = None  # what a strategy draws as "this must not be stored"
MAX_STEP = 2**63 - 1


class Raises:
    """An object every conversion of which raises: ``__str__``, ``__float__``, ``item``."""

    def __str__(self) -> str:
        raise RuntimeError("str() of this object raises")

    def __repr__(self) -> str:
        return "<Raises>"

    def __float__(self) -> float:
        raise RuntimeError("float() of this object raises")

    def __int__(self) -> int:
        raise RuntimeError("int() of this object raises")

    def __hash__(self) -> int:
        return id(self)

    @property
    def item(self) -> Any:
        raise RuntimeError("reading .item raises")


class StrIsNotText:
    def __str__(self) -> Any:
        return 42  # str() then raises TypeError


class Named:
    """A key object whose text is ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


# -- what is valid, written down ------------------------------------------------------


def key_is_valid(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return 0 < len(text) <= 256 and "\x00" not in text


any_text = st.text(st.characters(exclude_categories=()), max_size=40)
surrogate_text = st.builds(lambda a, s, b: a + s + b, any_text,
                           st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
                           any_text)
nul_text = st.builds(lambda a, b: a + "\x00" + b, any_text, any_text)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


long_text = st.integers(250, 262).map(lambda n: "k" * n) | st.just("x" * 100_000)


@st.composite
def keys(draw: st.DrawFn) -> tuple[Any, str | None]:
    """(a key to log, the text it is stored as or SKIP)."""
    kind = draw(st.sampled_from(["text", "text", "text", "surrogate", "nul", "long", "object",
                                 "object", "raises"]))
    if kind == "object":
        obj = draw(st.integers() | st.floats() | st.none() | st.booleans()
                   | st.tuples(st.integers(), any_text) | any_text.map(Named))
        text = str(obj)
        return obj, text if key_is_valid(text) else SKIP
    if kind == "raises":
        return draw(st.sampled_from([Raises(), StrIsNotText()])), SKIP
    text = draw({"text": any_text, "surrogate": surrogate_text, "nul": nul_text,
                 "long": long_text}[kind])
    return text, text if key_is_valid(text) else SKIP


def _float_of(value: int) -> float | None:
    try:
        return float(value)
    except OverflowError:
        return SKIP


@st.composite
def values(draw: st.DrawFn) -> tuple[Any, float | None]:
    """(a value to log, the float stored or SKIP)."""
    kind = draw(st.sampled_from(["float", "float", "float", "int", "int", "numpy", "numpy",
                                 "numpy0d", "torch", "torch", "bool", "none", "text", "raises",
                                 "fraction", "array", "complex"]))
    if kind == "float":
        x = draw(st.floats(allow_nan=True, allow_infinity=True))
        return x, x
    if kind == "int":
        i = draw(st.integers() | st.integers(min_value=2**1000, max_value=2**1100)
                 | st.integers(max_value=-(2**1030)))
        return i, _float_of(i)
    if kind == "numpy":
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64,
                                      np.uint64]))
        x = draw(st.floats(allow_nan=True, allow_infinity=True, width=16)
                 if dtype is np.float16 else
                 st.floats(width=32) if dtype is np.float32 else
                 st.floats() if dtype is np.float64 else
                 st.integers(int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)))
        scalar = dtype(x)
        return scalar, float(scalar.item())
    if kind == "numpy0d":
        x = draw(st.floats())
        return np.array(x), x
    if kind == "torch":
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]))
        shape = draw(st.sampled_from([(), (1,), (2,)]))
        if dtype is torch.bool:
            return torch.ones(shape, dtype=dtype), SKIP
        x = draw(st.integers(-(2**62), 2**62) if dtype is torch.int64 else
                 st.floats(width=32) if dtype is torch.float32 else st.floats())
        tensor = torch.full(shape, x, dtype=dtype)
        if shape == (2,):
            return tensor, SKIP
        return tensor, float(tensor.item())
    if kind == "fraction":
        f = Fraction(draw(st.integers(-1000, 1000)), draw(st.integers(1, 1000)))
        return f, float(f)
    if kind == "array":
        return np.zeros(draw(st.integers(2, 4))), SKIP
    return draw(st.sampled_from({
        "bool": [True, False, np.bool_(True)], "none": [None], "text": ["1.5", b"2", ""],
        "raises": [Raises()], "complex": [1j, np.complex128(1 + 2j)],
    }[kind])), SKIP


AUTO = object()  # step=None: the previous step + 1


@st.composite
def steps(draw: st.DrawFn) -> tuple[Any, Any]:
    """(a step to pass, the step it means: an int, AUTO, or SKIP for a call skipped whole)."""
    kind = draw(st.sampled_from(["none", "none", "none", "int", "int", "big", "negative",
                                 "float", "whole float", "bool", "numpy", "raises"]))
    if kind == "none":
        return None, AUTO
    if kind == "int":
        s = draw(st.integers(0, 1000) | st.integers(MAX_STEP - 5, MAX_STEP))
        return s, s
    if kind == "big":
        return draw(st.integers(MAX_STEP + 1, 2**70)), SKIP
    if kind == "negative":
        return draw(st.integers(max_value=-1)), SKIP
    if kind == "float":
        f = draw(st.floats().filter(lambda f: not float(f).is_integer()))
        return f, SKIP
    if kind == "whole float":
        f = float(draw(st.integers(0, 10**6)))
        return f, int(f)
    if kind == "bool":
        b = draw(st.booleans())
        return b, int(b)
    if kind == "numpy":
        s = draw(st.integers(0, 10**9))
        return np.int64(s), s
    return Raises(), SKIP


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[Any, float | None]:
    """(a timestamp to pass, the time stored, or None: about now)."""
    kind = draw(st.sampled_from(["none", "float", "int", "nonfinite", "text", "numpy"]))
    if kind == "none":
        return None, None
    if kind == "float":
        t = draw(st.floats(allow_nan=False, allow_infinity=False))
        return t, t
    if kind == "int":
        i = draw(st.integers(0, 2**40) | st.integers(min_value=2**1100, max_value=2**1101))
        return i, _float_of(i)
    if kind == "numpy":
        t = draw(st.floats(allow_nan=False, allow_infinity=False))
        return np.float64(t), t
    return draw(st.sampled_from([math.nan, math.inf, -math.inf, "soon", Raises()])), None


calls = st.tuples(st.lists(st.tuples(keys(), values()), min_size=1, max_size=8), steps(),
                  timestamps())


# -- the model -----------------------------------------------------------------------


def float_bits(value: float) -> str:
    """Equality that tells -0.0 from 0.0 and NaN from NaN (the payload aside)."""
    return "nan" if math.isnan(value) else repr(value)


class Model:
    """What the server must hold after a sequence of ``log()`` calls."""

    def __init__(self) -> None:
        self.step = -1
        self.points: Counter[tuple[str, int, str]] = Counter()
        self.times: dict[tuple[str, int], list[float]] = {}

    def call(self, pairs: list[tuple[tuple[Any, str | None], tuple[Any, float | None]]],
             step: Any, time: float | None, before: float, after: float) -> None:
        if step is SKIP:
            return
        if step is AUTO:
            step = self.step + 1
            if step > MAX_STEP:
                return
        self.step = step
        stored: dict[str, float] = {}
        for (_, text), (_, value) in pairs:
            if text is SKIP or value is SKIP:
                continue
            stored[text] = value
        for text, value in stored.items():
            self.points[(text, step, float_bits(value))] += 1


def server_points(server: ServerProcess, run: pluto.Run) -> tuple[
        Counter[tuple[str, int, str]], dict[tuple[str, int], list[float]]]:
    rows = query.get_metrics(run.id, url=server.url)
    points: Counter[tuple[str, int, str]] = Counter()
    times: dict[tuple[str, int], list[float]] = {}
    for key, series in rows.items():
        for row in series:
            points[(key, row.step, float_bits(row.value))] += 1
            times.setdefault((key, row.step), []).append(row.time)
    return points, times


@pytest.fixture
def fuzz_run(shared_server: ServerProcess, project: str,
             tmp_path: Path) -> Iterator[Callable[..., pluto.Run]]:
    runs: list[pluto.Run] = []

    def start(**kwargs: Any) -> pluto.Run:
        kwargs.setdefault("project", project)
        kwargs.setdefault("dir", tmp_path / "pluto")
        run = pluto.init(settings={**FAST, "url": shared_server.url}, **kwargs)
        runs.append(run)
        return run

    yield start
    for run in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.finish()


# -- log() ---------------------------------------------------------------------------


def test_log_never_raises_and_every_valid_point_arrives_exactly(
    shared_server: ServerProcess, fuzz_run: Callable[..., pluto.Run],
) -> None:
    run = fuzz_run()
    model = Model()
    # (key, step) -> the timestamp passed, for the points whose time must arrive exactly.
    exact_times: dict[tuple[str, int], set[float]] = {}
    window: list[tuple[str, int, float, float]] = []

    @FUZZ
    @given(call_list=st.lists(calls, min_size=1, max_size=6))
    def check(call_list: list[Any]) -> None:
        for pairs, (step_in, step_means), (time_in, time_means) in call_list:
            # A dict holds one entry per distinct key (1, 1.0 and True are one): the first
            # key object with the last value, as the dict given to log() will.
            entries: dict[Any, tuple[str | None, Any, float | None]] = {}
            for (key, text), (value, means) in pairs:
                first_text = entries[key][0] if key in entries else text
                entries[key] = (first_text, value, means)
            data = {key: value for key, (_, value, _) in entries.items()}
            ordered = [((key, text), (value, means))
                       for key, (text, value, means) in entries.items()]
            before = pluto_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run.log(data, step=step_in, timestamp=time_in)  # must not raise
            after = pluto_time()
            step = model.step + 1 if step_means is AUTO else step_means
            model.call(ordered, step_means, time_means, before, after)
            if step_means is not SKIP and (step_means is not AUTO or step <= MAX_STEP):
                for (_, text), (_, means) in ordered:
                    if text is SKIP or means is SKIP:
                        continue
                    if time_means is not None:
                        exact_times.setdefault((text, step), set()).add(time_means)
                    else:
                        window.append((text, step, before, after))

    check()
    run.finish()
    assert run.undelivered_bytes == 0
    assert sum(model.points.values()) >= 50, model.points  # the examples did store points
    points, times = server_points(shared_server, run)
    missing = model.points - points
    extra = points - model.points
    assert not missing and not extra, (
        f"{sum(missing.values())} points missing, e.g. {list(missing)[:5]}; "
        f"{sum(extra.values())} unexpected, e.g. {list(extra)[:5]}")
    for where, wanted in exact_times.items():
        assert wanted <= set(times[where]), (where, wanted, times[where])
    for text, step, before, after in window:
        assert any(before - 1 <= t <= after + 1 for t in times[(text, step)]), (
            text, step, times[(text, step)])


def pluto_time() -> float:
    return time.time()


def test_log_with_data_that_is_not_a_mapping_never_raises(
    fuzz_run: Callable[..., pluto.Run],
) -> None:
    run = fuzz_run()

    @FUZZ
    @given(data=st.none() | st.integers() | any_text | st.lists(st.integers())
           | st.just(Raises()))
    def check(data: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.log(data)

    check()


# -- init(), update_config(), add_tags() ---------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
             | st.floats(allow_nan=False, allow_infinity=False)
             | st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
valid_config = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10),
    max_size=6)
odd_leaf = (json_leaf | surrogate_text | nul_text | st.integers(min_value=2**64) | st.floats()
            | st.just(Raises()) | st.sampled_from([np.float32(1.5), np.arange(3), torch.ones(2),
                                                   Fraction(1, 3), 1j, b"bytes", {1, 2}]))
odd_config = st.dictionaries(
    st.text(max_size=8) | surrogate_text | st.integers() | st.just(Raises()) | st.none(),
    st.recursive(odd_leaf, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3)
                 | st.tuples(inner), max_leaves=10),
    max_size=6) | st.none() | st.just(Raises()) | st.lists(st.integers(), max_size=2)
valid_tag = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128)
odd_tags = (st.lists(valid_tag | any_text | surrogate_text | nul_text | long_text | st.integers()
                     | st.just(Raises()), max_size=8)
            | any_text | st.none() | st.just(Raises()) | st.integers())
odd_name = (any_text | surrogate_text | nul_text | long_text | st.integers()
            | st.just(Raises()))


def test_init_with_any_name_config_and_tags_starts_a_run(
    fuzz_run: Callable[..., pluto.Run],
) -> None:
    @settings(FUZZ, max_examples=25)
    @given(name=odd_name | st.none(), config=odd_config, tags=odd_tags)
    def check(name: Any, config: Any, tags: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = fuzz_run(name=name, config=config, tags=tags)
        assert run.id > 0
        assert all(isinstance(tag, str) and 0 < len(tag) <= 128 for tag in run.tags)
        assert len(run.name) <= 256
        if isinstance(name, str) and key_is_valid(name):
            assert run.name == name

    check()


def test_valid_metadata_arrives_exactly(
    shared_server: ServerProcess, fuzz_run: Callable[..., pluto.Run],
) -> None:
    @settings(FUZZ, max_examples=20)
    @given(name=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                        min_size=1, max_size=256),
           config=valid_config,
           # A NUL in a tag is storable (tags are JSON); a lone surrogate is not (any_text
           # can hold one, and the SDK then stores its escaped text, with a warning).
           tags=st.lists(valid_tag | nul_text.filter(lambda t: len(t) <= 128
                                                     and not _has_surrogate(t)), max_size=6,
                         unique=True))
    def check(name: str, config: dict[str, Any], tags: list[str]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # valid metadata is never adjusted
            run = fuzz_run(name=name, config=config, tags=tags)
        stored = query.get_run(run.id, url=shared_server.url)
        assert stored.name == name
        assert stored.config == config
        assert stored.tags == tags

    check()


def test_update_config_and_add_tags_never_raise_and_valid_ones_arrive(
    shared_server: ServerProcess, fuzz_run: Callable[..., pluto.Run],
) -> None:
    run = fuzz_run()
    tags: list[str] = []
    config: dict[str, Any] = {}

    @settings(FUZZ, max_examples=40)
    @given(odd=odd_config, odd_tag_list=odd_tags, good=valid_config,
           good_tags=st.lists(valid_tag, max_size=3))
    def check(odd: Any, odd_tag_list: Any, good: dict[str, Any], good_tags: list[str]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.update_config(odd)
            run.add_tags(odd_tag_list)
        # Valid updates under a key of this test's own, so the odd ones cannot touch them.
        mine = f"valid-{uuid.uuid4().hex[:8]}"
        run.update_config({mine: good})
        run.add_tags(good_tags)
        config[mine] = good
        tags.extend(good_tags)

    check()
    stored = query.get_run(run.id, url=shared_server.url)
    for mine, good in config.items():
        assert stored.config[mine] == good, mine
    assert set(tags) <= set(stored.tags)


# -- the server refuses a NUL itself -------------------------------------------------


@pytest.mark.parametrize("field", ["key", "session", "run_ref"])
def test_the_server_refuses_a_nul_in_a_key_with_422_and_keeps_console_text(
    shared_server: ServerProcess, fuzz_run: Callable[..., pluto.Run], field: str,
) -> None:
    """On PostgreSQL a NUL used to raise in the database: a 500, which a sidecar retries for
    ever. Now it is a 422 naming the field (a sidecar dead-letters it); a NUL printed to the
    console is kept as U+FFFD instead of costing the chunk its points."""
    run = fuzz_run()
    chunk = Chunk(run=run.id, session=uuid.uuid4().hex, seq=0, writer=0, keys=["ok"],
                  key_index=[0], steps=[0], values=[1.0], times=[1.0])
    if field == "key":
        chunk.keys = ["loss\x00"]
    elif field == "session":
        chunk.session = "s\x00"
    else:
        chunk.run, chunk.project, chunk.run_ref = 0, run.project, "ref\x00"
    reply = httpx.post(f"{shared_server.url}/api/v1/ingest",
                       content=msgspec.msgpack.encode(IngestBatch(chunks=[chunk])),
                       headers={"content-type": "application/msgpack"}, timeout=10)
    assert reply.status_code == 422, reply.text
    assert "NUL" in reply.json()["detail"], reply.text

    printed = Chunk(run=run.id, session=uuid.uuid4().hex, seq=0, writer=0, keys=["ok"],
                    key_index=[0], steps=[7], values=[2.0], times=[1.0],
                    logs=[LogLine(time=1.0, stream=1, line="a\x00b")])
    reply = httpx.post(f"{shared_server.url}/api/v1/ingest",
                       content=msgspec.msgpack.encode(IngestBatch(chunks=[printed])),
                       headers={"content-type": "application/msgpack"}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert [row.step for row in query.get_metrics(run.id, url=shared_server.url)["ok"]] == [7]
    lines = httpx.get(f"{shared_server.url}/api/v1/runs/{run.id}/logs", timeout=10).json()
    assert "a\ufffdb" in str(lines), lines

    # The SDK never sends such a key: it is skipped with a warning, the rest is logged.
    with pytest.warns(RuntimeWarning, match="NUL"):
        run.log({"bad\x00key": 1.0, "fine": 2.0}, step=3)
    run.finish()
    stored = query.get_metrics(run.id, url=shared_server.url)
    assert "bad\x00key" not in stored and [r.step for r in stored["fine"]] == [3]


def test_a_nul_in_a_run_name_is_stored_as_a_replacement_character_with_a_warning(
    shared_server: ServerProcess, fuzz_run: Callable[..., pluto.Run],
) -> None:
    """PostgreSQL cannot store a NUL in text: ``init()`` used to fail with a 500 there."""
    with pytest.warns(RuntimeWarning, match="a NUL in the name is stored as U\\+FFFD"):
        run = fuzz_run(name="a\x00b")
    assert run.name == "a\ufffdb"
    assert query.get_run(run.id, url=shared_server.url).name == "a\ufffdb"
