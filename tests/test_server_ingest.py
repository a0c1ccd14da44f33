"""Ingest over HTTP: exactly-once chunks, non-finite values, writers, bad and huge bodies,
zstd and gzip bodies.

A chunk's ``(run, session, seq)`` is its idempotency key: however often and
however concurrently it arrives, its points and log lines are stored once.
Every test runs against a real server on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable, Iterator

import httpx
import msgspec
import pytest
import zstandard
from api_helpers import (
    Api,
    Json,
    all_at_once,
    assert_error,
    chunk,
    ramp,
    unique_project,
)
from support.server_process import ServerProcess

from pluto.wire import JSON, MSGPACK, IngestBatch, encode_json, encode_msgpack


@pytest.fixture(scope="module")
def api(shared_server: ServerProcess) -> Iterator[Api]:
    with Api(shared_server.url) as client:
        yield client


@pytest.fixture
def run(api: Api) -> Json:
    return api.create_ok(unique_project("ingest"))


def same_bits(a: list[float], b: list[float]) -> bool:
    return [struct.pack("<d", x) for x in a] == [struct.pack("<d", x) for x in b]


# -- exactly once ------------------------------------------------------------------------


def test_a_chunk_sent_five_times_in_a_row_is_applied_once(api: Api, run: Json) -> None:
    once = chunk(
        run["id"],
        {"loss": ramp(0, 9), "acc": ramp(0, 4)},
        session="w0",
        seq=3,
        logs=[(1, "epoch 0 done")],
    )
    answers = [api.ingest_ok(once) for _ in range(5)]
    assert answers[0] == {"applied": 1, "duplicates": 0, "points": 15}
    assert answers[1:] == [{"applied": 0, "duplicates": 1, "points": 0}] * 4

    assert api.one_series(run["id"], "loss").steps == list(range(10))
    assert api.one_series(run["id"], "acc").values == [float(s) for s in range(5)]
    lines = api.logs(run["id"]).json()["lines"]
    assert [line["line"] for line in lines] == ["epoch 0 done"]


def test_a_chunk_sent_from_8_threads_at_once_is_applied_once(api: Api, run: Json) -> None:
    once = chunk(
        run["id"],
        {"loss": ramp(0, 99)},
        session="w0",
        seq=0,
        logs=[(1, "only once"), (2, "also only once")],
    )
    answers = all_at_once(8, lambda _: api.ingest(once))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    bodies = [r.json() for r in answers]
    assert sum(b["applied"] for b in bodies) == 1
    assert sum(b["duplicates"] for b in bodies) == 7
    assert sum(b["points"] for b in bodies) == 100

    series = api.one_series(run["id"], "loss")
    assert series.steps == list(range(100))
    assert len(api.logs(run["id"]).json()["lines"]) == 2


def test_a_retried_batch_applies_only_its_new_chunks(api: Api, run: Json) -> None:
    first = chunk(run["id"], {"loss": ramp(0, 4)}, session="w0", seq=0)
    second = chunk(run["id"], {"loss": ramp(5, 9)}, session="w0", seq=1)
    third = chunk(run["id"], {"loss": ramp(10, 11)}, session="w0", seq=2)
    assert api.ingest_ok(first) == {"applied": 1, "duplicates": 0, "points": 5}
    assert api.ingest_ok(first, second) == {"applied": 1, "duplicates": 1, "points": 5}
    assert api.ingest_ok(third, second, first, third) == {
        "applied": 1,
        "duplicates": 3,
        "points": 2,
    }
    assert api.one_series(run["id"], "loss").steps == list(range(12))


def test_the_idempotency_key_is_run_session_and_seq(api: Api, run: Json) -> None:
    other_run = api.create_ok(run["project"])
    replies = [
        api.ingest_ok(chunk(run["id"], {"k": [(0, 1.0)]}, session="a", seq=0)),
        api.ingest_ok(chunk(run["id"], {"k": [(0, 2.0)]}, session="b", seq=0)),
        api.ingest_ok(chunk(run["id"], {"k": [(0, 3.0)]}, session="a", seq=1)),
        api.ingest_ok(chunk(other_run["id"], {"k": [(0, 4.0)]}, session="a", seq=0)),
    ]
    assert [r["applied"] for r in replies] == [1, 1, 1, 1]
    # A different payload under a key already applied is a retry: ignored, not merged.
    again = api.ingest_ok(chunk(run["id"], {"k": [(0, 99.0)]}, session="a", seq=0))
    assert again == {"applied": 0, "duplicates": 1, "points": 0}
    assert sorted(api.one_series(run["id"], "k").values) == [1.0, 2.0, 3.0]
    assert api.one_series(other_run["id"], "k").values == [4.0]


def test_concurrent_writers_to_one_run_all_land(api: Api, run: Json) -> None:
    def write(rank: int) -> httpx.Response:
        chunks = [
            chunk(
                run["id"],
                {"loss": ramp(10 * seq, 10 * seq + 9, lambda s: rank + s)},
                writer=rank,
                session=f"rank{rank}",
                seq=seq,
            )
            for seq in range(5)
        ]
        return api.ingest(*chunks)

    answers = all_at_once(8, write)
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    by_writer = api.series(run["id"], "loss")
    assert [series.writer for series in by_writer] == list(range(8))
    for rank, series in enumerate(by_writer):
        assert series.steps == list(range(50))
        assert series.values == [float(rank + s) for s in range(50)]
    info = api.get_ok(run["id"])
    assert (info["first_step"], info["last_step"]) == (0, 49)


def test_concurrent_first_uses_of_the_same_new_keys_in_any_order_all_succeed(
    api: Api, backend: str, request: pytest.FixtureRequest
) -> None:
    """Ranks meet new keys in different orders; no request may fail (e.g. a deadlock)."""
    project = unique_project("keys")
    ranks = 4
    runs = [api.create_ok(project)["id"] for _ in range(ranks)]
    for round_ in range(3):
        names = [f"r{round_}/metric{i:03d}" for i in range(200)]

        def write(rank: int, names: list[str] = names, step: int = round_) -> httpx.Response:
            ordered = names if rank % 2 == 0 else names[::-1]
            return api.ingest(
                chunk(runs[rank], {name: [(step, 1.0)] for name in ordered}, writer=rank)
            )

        answers = all_at_once(ranks, write)
        assert [r.status_code for r in answers] == [200] * ranks, [r.text[:300] for r in answers]
    keys = api.keys(runs[3]).json()["keys"]
    assert len(keys) == 600


# -- values ---------------------------------------------------------------------------------


def test_nan_and_infinities_round_trip_as_msgpack_floats_and_json_strings(
    api: Api, run: Json
) -> None:
    values = [math.nan, math.inf, -math.inf, 1.5, -0.0, 5e-324, 1.7976931348623157e308]
    api.log(run["id"], {"odd": list(enumerate(values))})

    packed = api.one_series(run["id"], "odd")
    assert same_bits(packed.values, values)  # bit for bit, -0.0 and denormals included

    resp = api.metrics_raw(run["id"], msgpack=False, keys=["odd"])
    assert resp.status_code == 200 and resp.headers["content-type"].startswith(JSON)
    assert resp.json()["series"][0]["values"] == [
        "NaN",
        "Infinity",
        "-Infinity",
        1.5,
        -0.0,
        5e-324,
        1.7976931348623157e308,
    ]
    bucketed = api.metrics_raw(run["id"], msgpack=False, keys=["odd"], buckets=7).json()
    series = bucketed["series"][0]
    assert series["maxs"][:3] == ["NaN", "Infinity", "-Infinity"]
    assert series["means"][:3] == ["NaN", "Infinity", "-Infinity"]


def test_json_ingest_accepts_the_non_finite_strings_the_server_answers_with(
    api: Api, run: Json
) -> None:
    body = msgspec.to_builtins(IngestBatch(chunks=[chunk(run["id"], {"k": ramp(0, 3)})]))
    body["chunks"][0]["values"] = ["NaN", "Infinity", "-Infinity", 1.0]
    resp = api.request("POST", "/ingest", json=body)
    assert resp.status_code == 200, resp.text
    assert same_bits(api.one_series(run["id"], "k").values, [math.nan, math.inf, -math.inf, 1.0])


def test_json_ingest_of_finite_values_works(api: Api, run: Json) -> None:
    resp = api.request(
        "POST",
        "/ingest",
        content=encode_json(IngestBatch(chunks=[chunk(run["id"], {"k": ramp(0, 3)}, seq=7)])),
        headers={"content-type": JSON},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"applied": 1, "duplicates": 0, "points": 4}
    assert api.one_series(run["id"], "k").values == [0.0, 1.0, 2.0, 3.0]


def test_two_writers_logging_one_key_at_one_step_are_both_kept(api: Api, run: Json) -> None:
    api.log(run["id"], {"loss": [(5, 1.0)]}, writer=0, time=100.0)
    api.log(run["id"], {"loss": [(5, 2.0)]}, writer=1, time=101.0)
    api.log(run["id"], {"loss": [(5, 3.0)]}, writer=1, time=102.0)  # a repeated step: kept

    split = {s.writer: (s.steps, s.values) for s in api.series(run["id"], "loss")}
    assert split == {0: ([5], [1.0]), 1: ([5, 5], [2.0, 3.0])}
    only_one = api.one_series(run["id"], "loss", writer=1)
    assert (only_one.writer, only_one.values) == (1, [2.0, 3.0])
    mean = api.one_series(run["id"], "loss", aggregate="mean")
    assert (mean.writer, mean.steps, mean.values) == (None, [5], [2.0])


# -- bad ingest bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "phrases"),
    [
        ("values", [1.0, 2.0], ("values has 2 entries but steps has 3",)),
        ("times", [0.0], ("times has 1 entries but steps has 3",)),
        ("key_index", [0, 0], ("key_index has 2 entries but steps has 3",)),
        ("key_index", [0, 1, 0], ("key_index refers to a key that is not in keys", "1 keys")),
        ("key_index", [0, -1, 0], ("key_index refers to a key that is not in keys",)),
        ("steps", [0, -5, 2], ("steps must be between 0 and 2**63-1",)),
        ("session", "", ("session must be 1-64 characters",)),
        ("writer", -1, ("must be between 0 and 2**",)),
        ("keys", [""], ("metric key", "must be 1-256 characters")),
    ],
)
def test_a_malformed_chunk_is_refused_whole_with_what_to_change(
    api: Api, run: Json, field: str, value: object, phrases: tuple[str, ...]
) -> None:
    good = chunk(run["id"], {"ok": ramp(0, 2)}, seq=1)
    bad = msgspec.structs.replace(chunk(run["id"], {"m": ramp(0, 2)}, seq=2), **{field: value})
    assert_error(api.ingest(good, bad), 422, "chunk 1", f"run {run['id']}", *phrases)
    # Nothing of the batch was applied: sending the good chunk alone applies it now.
    assert api.keys(run["id"]).json()["keys"] == []
    assert api.ingest_ok(good)["applied"] == 1


def test_ingest_for_an_unknown_run_is_404_and_applies_nothing(api: Api, run: Json) -> None:
    good = chunk(run["id"], {"ok": ramp(0, 2)})
    orphan = chunk(999_999_999, {"ok": ramp(0, 2)})
    assert_error(
        api.ingest(good, orphan),
        404,
        "run 999999999 does not exist",
        "create it with POST /api/v1/runs before logging",
    )
    assert api.keys(run["id"]).json()["keys"] == []
    assert api.ingest_ok(good)["applied"] == 1


@pytest.mark.parametrize(
    ("content_type", "body", "phrases"),
    [
        (MSGPACK, b"\xc1\xc1\xc1", ("the body is not valid MessagePack",)),
        (JSON, b'{"chunks": [', ("the body is not valid JSON",)),
        (
            JSON,
            b'{"chunks": [{"run": 1}]}',
            ("invalid IngestBatch", "missing required field", "$.chunks[0]"),
        ),
        (JSON, b'{"chunk": []}', ("invalid IngestBatch", "unknown field `chunk`")),
        (
            JSON,
            b'{"chunks": [{"run": "one", "session": "s", "seq": 0, "writer": 0}]}',
            ("Expected `int`, got `str`", "$.chunks[0].run"),
        ),
        (
            MSGPACK,
            encode_msgpack(
                {"chunks": [{"run": 1, "session": "s", "seq": 0, "writer": 0, "value": [1.0]}]}
            ),
            ("unknown field `value`", "$.chunks[0]"),
        ),
    ],
)
def test_an_undecodable_ingest_body_is_422(
    api: Api, content_type: str, body: bytes, phrases: tuple[str, ...]
) -> None:
    resp = api.request("POST", "/ingest", content=body, headers={"content-type": content_type})
    assert_error(resp, 422, *phrases)


OUT_OF_RANGE_FIELDS: list[tuple[str, Json]] = [
    ("step-2**63", {"steps": [2**63]}),
    ("step-2**62+1", {"steps": [2**62 + 1]}),
    ("seq-10**23", {"seq": 10**23}),
    ("run-2**40", {"run": 2**40}),
    ("run-10**23", {"run": 10**23}),
    ("writer-2**40", {"writer": 2**40}),
    ("writer-10**23", {"writer": 10**23}),
]


def _ints(fields: Json) -> list[int]:
    return [
        v
        for value in fields.values()
        for v in (value if isinstance(value, list) else [value])
        if isinstance(v, int)
    ]


@pytest.mark.parametrize(
    ("case", "fields"), OUT_OF_RANGE_FIELDS, ids=[case[0] for case in OUT_OF_RANGE_FIELDS]
)
def test_integers_beyond_storage_are_refused_or_kept(
    api: Api,
    run: Json,
    backend: str,
    request: pytest.FixtureRequest,
    case: str,
    fields: Json,
) -> None:
    """A chunk the server cannot store is a 4xx; one it accepts is returned by queries."""
    body = msgspec.to_builtins(IngestBatch(chunks=[chunk(run["id"], {"k": [(1, 1.0)]})]))
    body["chunks"][0].update(fields)
    if any(abs(v) >= 2**64 for v in _ints(fields)):  # beyond MessagePack: only JSON can say it
        resp = api.request("POST", "/ingest", json=body)
    else:
        resp = api.request(
            "POST",
            "/ingest",
            content=msgspec.msgpack.encode(body),
            headers={"content-type": MSGPACK},
        )
    assert resp.status_code < 500, f"{case}: {resp.status_code} {resp.text}"
    if resp.status_code == 200 and "run" not in fields:
        assert resp.json()["applied"] == 1
        (series,) = api.series(run["id"], "k")
        assert series.steps == fields.get("steps", [1])
        assert series.writer == fields.get("writer", 0)


# -- size limits -----------------------------------------------------------------------------------


def gzip_of_zeros(size: int) -> bytes:
    """A gzip member inflating to ``size`` zero bytes: about a thousandth of that on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    parts = [
        packer.compress(block[: min(len(block), size - done)])
        for done in range(0, size, len(block))
    ]
    return b"".join(parts) + packer.flush()


def test_bodies_over_the_limit_are_413_before_and_after_decompression(
    server_factory: Callable[..., ServerProcess], backend: str, request: pytest.FixtureRequest
) -> None:
    database_url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    small = server_factory(database_url, extra_args=["--max-body-mb", "0.01"])  # 10,485 bytes
    with Api(small.url) as api:
        project = unique_project("limits")
        padded = api.create(project, config={"blob": "x" * 20_000})
        assert_error(
            padded,
            413,
            "larger than this server's limit of 10485 bytes",
            "send smaller batches",
            "--max-body-mb",
        )

        run = api.create_ok(project)
        big = chunk(run["id"], {"loss": ramp(0, 2000)})
        assert_error(api.ingest(big), 413, "larger than this server's limit")

        # Streamed without a Content-Length: cut off once it passes the limit.
        payload = encode_msgpack(IngestBatch(chunks=[big]))
        streamed = api.request(
            "POST",
            "/ingest",
            headers={"content-type": MSGPACK},
            content=iter([payload[i : i + 4096] for i in range(0, len(payload), 4096)]),
        )
        assert_error(streamed, 413, "larger than this server's limit")

        bomb = gzip_of_zeros(8 << 20)
        assert len(bomb) < 10_000
        resp = api.request(
            "POST",
            "/ingest",
            content=bomb,
            headers={"content-type": MSGPACK, "content-encoding": "gzip"},
        )
        assert_error(resp, 413, "larger than this server's limit", "(after decompression)")

        # Gzip itself is fine: a small compressed body is accepted ...
        small_batch = chunk(run["id"], {"loss": ramp(0, 9)})
        resp = api.request(
            "POST",
            "/ingest",
            content=gzip.compress(encode_msgpack(IngestBatch(chunks=[small_batch]))),
            headers={"content-type": MSGPACK, "content-encoding": "gzip"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["points"] == 10
        # ... and a corrupt one is a 422 that says so.
        resp = api.request(
            "POST",
            "/ingest",
            content=b"\x1f\x8b" + b"garbage" * 10,
            headers={"content-type": MSGPACK, "content-encoding": "gzip"},
        )
        assert_error(resp, 422, "the gzip body could not be decompressed")
        assert small.healthy()
        assert api.one_series(run["id"], "loss").steps == list(range(10))


def test_a_gzip_bomb_is_refused_by_a_server_with_the_default_limit(api: Api, run: Json) -> None:
    bomb = gzip_of_zeros(80 << 20)  # 80 MiB of zeros, default limit 64 MiB
    resp = api.request(
        "POST",
        "/ingest",
        content=bomb,
        headers={"content-type": MSGPACK, "content-encoding": "gzip"},
    )
    assert_error(
        resp, 413, "larger than this server's limit of 67108864 bytes", "(after decompression)"
    )
    assert api.keys(run["id"]).json()["keys"] == []


# -- chunks addressed by external id (how the sidecar spools before ids are known) ------------


def _zstd(data: bytes, **params: int) -> bytes:
    """``data`` as one zstd frame that does not say its size, as a streaming client sends it."""
    parameters = zstandard.ZstdCompressionParameters.from_level(1, **params)
    compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()
    return compressor.compress(data) + compressor.flush()


def test_a_zstd_body_is_decompressed_and_a_bad_or_huge_one_refused(api: Api, run: Json) -> None:
    def post(content: bytes, encoding: str = "zstd") -> httpx.Response:
        return api.request("POST", "/ingest", content=content,
                           headers={"content-type": MSGPACK, "content-encoding": encoding})

    first = encode_msgpack(IngestBatch(chunks=[chunk(run["id"], {"loss": ramp(0, 9)})]))
    resp = post(_zstd(first))
    assert resp.status_code == 200, resp.text
    assert resp.json()["points"] == 10
    # Frames that say their size (what a sidecar sends), two frames one after the other,
    # and the coding's name in capitals are all fine.
    second = encode_msgpack(IngestBatch(chunks=[chunk(run["id"], {"loss": ramp(10, 19)},
                                                       seq=1)]))
    assert post(zstandard.ZstdCompressor().compress(second), "ZSTD").json()["points"] == 10
    half = len(second) // 2
    third = encode_msgpack(IngestBatch(chunks=[chunk(run["id"], {"loss": ramp(20, 29)},
                                                      seq=2)]))
    assert post(_zstd(third[:half]) + _zstd(third[half:])).json()["points"] == 10

    assert_error(post(b"\x28\xb5\x2f\xfd" + b"garbage" * 10), 422,
                 "the zstd body could not be decompressed")
    # A window of 128 MiB (zstd's own decoder limit) is memory the server does not give one
    # request: the answer says how to compress instead.
    assert_error(post(_zstd(first, window_log=27)), 422, "could not be decompressed",
                 "level 19 or lower")
    bomb = _zstd(bytes(80 << 20))  # 80 MiB of zeros, default limit 64 MiB
    assert len(bomb) < 10_000
    assert_error(post(bomb), 413, "larger than this server's limit of 67108864 bytes",
                 "(after decompression)")
    assert api.one_series(run["id"], "loss").steps == list(range(30))


def test_an_unknown_coding_is_415_naming_the_ones_the_server_takes(api: Api, run: Json) -> None:
    batch = encode_msgpack(IngestBatch(chunks=[chunk(run["id"], {"loss": ramp(0, 9)})]))
    for coding in ("br", "gzip, zstd", "deflate"):
        resp = api.request("POST", "/ingest", content=batch,
                           headers={"content-type": MSGPACK, "content-encoding": coding})
        assert_error(resp, 415, f"content-encoding {coding!r} is not supported",
                     "zstd, gzip or uncompressed")
        assert resp.headers["accept-encoding"] == "zstd, gzip"
    assert api.series(run["id"], "loss") == []
    # "identity" is no coding at all.
    resp = api.request("POST", "/ingest", content=batch,
                       headers={"content-type": MSGPACK, "content-encoding": "identity"})
    assert resp.status_code == 200, resp.text


def test_every_api_answer_says_which_codings_the_server_takes(api: Api, run: Json) -> None:
    """RFC 7694: a sidecar learns from any answer that it may send zstd."""
    for resp in (api.request("GET", "/health"), api.get(run["id"]),
                 api.request("GET", "/runs/999999999"),
                 api.request("POST", "/ingest", content=b"{", headers={"content-type": JSON})):
        assert resp.headers.get("accept-encoding") == "zstd, gzip", (resp.status_code,
                                                                     resp.headers)


def test_a_chunk_can_name_its_run_by_project_and_external_id(api: Api) -> None:
    project = unique_project("byref")
    run = api.create_ok(project, run_id="job-7")
    addressed = chunk(0, {"loss": ramp(0, 4)})
    addressed.project, addressed.run_ref = project, "job-7"
    assert api.ingest_ok(addressed)["applied"] == 1
    assert api.ingest_ok(addressed)["duplicates"] == 1  # same (run, session, seq): once
    assert api.one_series(run["id"], "loss").steps == [0, 1, 2, 3, 4]


def test_a_chunk_may_name_its_run_as_resume_would_find_it(api: Api) -> None:
    """A rank that resumed a run by its display or numeric id through a sidecar sends
    chunks with that ref: they land in that run. An external id wins over a display or
    numeric id that happens to be spelled the same (the run that ref was opened as)."""
    project = unique_project("byref")
    run = api.create_ok(project, run_id="job-10")
    digits = api.create_ok(project, run_id=str(run["id"]))  # external id "<run's numeric id>"
    for seq, ref in enumerate([run["display_id"], str(run["id"])]):
        addressed = chunk(0, {"loss": [(seq, 1.0)]}, seq=seq)
        addressed.project, addressed.run_ref = project, ref
        assert api.ingest_ok(addressed)["applied"] == 1
    assert api.one_series(run["id"], "loss").steps == [0]
    assert api.one_series(digits["id"], "loss").steps == [1]
    elsewhere = chunk(0, {"loss": [(0, 1.0)]})
    elsewhere.project, elsewhere.run_ref = unique_project("byref"), run["display_id"]
    assert_error(api.ingest(elsewhere), 404, "does not exist in project")


def test_a_chunk_naming_an_unknown_or_half_named_run_is_refused(api: Api) -> None:
    project = unique_project("byref")
    api.create_ok(project, run_id="job-8")
    unknown = chunk(0, {"loss": [(0, 1.0)]})
    unknown.project, unknown.run_ref = project, "job-9"
    assert_error(api.ingest(unknown), 404, "'job-9' does not exist", "POST /api/v1/runs")
    half = chunk(0, {"loss": [(0, 1.0)]})
    half.run_ref = "job-8"
    assert_error(api.ingest(half), 422, "project and run_ref")
