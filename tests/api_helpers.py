"""A thin HTTP client of the tracking server, for the ``test_server_*`` suites.

Nothing here hides behaviour under test: every method is one HTTP request and
returns the raw ``httpx.Response`` (or, for the ``*_ok`` helpers, the decoded
body after asserting the status). Bodies are built from ``pluto.wire`` so the
tests speak the same wire format as the SDK and the sidecar.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import httpx
import msgspec

from pluto.wire import (
    API_PREFIX,
    JSON,
    MSGPACK,
    Chunk,
    IngestBatch,
    LogLine,
    MetricQueryResult,
    MetricSeries,
    encode_msgpack,
)

T = TypeVar("T")
Json = dict[str, Any]


def unique_project(stem: str = "p") -> str:
    """A project name no other test uses (tests share a server)."""
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def detail(resp: httpx.Response) -> str:
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str), resp.text
    return str(body["detail"])


def assert_error(resp: httpx.Response, status: int, *phrases: str) -> str:
    """The answer is ``status`` and its ``detail`` names every phrase (what to change)."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    text = detail(resp)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in the error message {text!r}"
    return text


def chunk(
    run: int,
    series: Mapping[str, Iterable[tuple[int, float]]] | None = None,
    *,
    writer: int = 0,
    session: str | None = None,
    seq: int = 0,
    time: float = 1_700_000_000.0,
    logs: Sequence[tuple[int, str]] = (),
) -> Chunk:
    """A chunk from ``{key: [(step, value), ...]}``, columnar as on the wire."""
    keys: list[str] = []
    key_index: list[int] = []
    steps: list[int] = []
    values: list[float] = []
    for key, points in (series or {}).items():
        keys.append(key)
        for step, value in points:
            key_index.append(len(keys) - 1)
            steps.append(step)
            values.append(value)
    return Chunk(
        run=run,
        session=session or uuid.uuid4().hex,
        seq=seq,
        writer=writer,
        keys=keys,
        key_index=key_index,
        steps=steps,
        values=values,
        times=[time + i for i in range(len(steps))],
        logs=[LogLine(time=time + i, stream=stream, line=line)
              for i, (stream, line) in enumerate(logs)],
    )


def ramp(first: int, last: int, value: Callable[[int], float] = float) -> list[tuple[int, float]]:
    """Points ``(step, value(step))`` for steps ``first..last`` inclusive."""
    return [(step, value(step)) for step in range(first, last + 1)]


class Api:
    """One ``httpx.Client`` against one server; safe to share between threads."""

    def __init__(self, base_url: str, *, key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.base_url = base_url
        self.client = httpx.Client(
            base_url=base_url + API_PREFIX,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def __enter__(self) -> Api:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    # -- raw requests ------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, **kwargs)

    def create(self, project: str, **fields: Any) -> httpx.Response:
        return self.client.post("/runs", json={"project": project, **fields})

    def get(self, ref: str | int, project: str | None = None) -> httpx.Response:
        return self.client.get(f"/runs/{ref}", params=_params(project=project))

    def patch(self, ref: str | int, body: Json, project: str | None = None) -> httpx.Response:
        return self.client.patch(f"/runs/{ref}", json=body, params=_params(project=project))

    def finish(self, ref: str | int, status: str = "COMPLETED",
               project: str | None = None) -> httpx.Response:
        return self.client.post(f"/runs/{ref}/finish", json={"status": status},
                                params=_params(project=project))

    def lineage(self, ref: str | int, project: str | None = None) -> httpx.Response:
        return self.client.get(f"/runs/{ref}/lineage", params=_params(project=project))

    def ingest(self, *chunks: Chunk) -> httpx.Response:
        return self.client.post(
            "/ingest",
            content=encode_msgpack(IngestBatch(chunks=list(chunks))),
            headers={"content-type": MSGPACK, "accept": JSON},
        )

    def metrics_raw(self, ref: str | int, *, msgpack: bool = True, **params: Any) -> httpx.Response:
        return self.client.get(
            f"/runs/{ref}/metrics",
            params=_params(**params),
            headers={"accept": MSGPACK if msgpack else JSON},
        )

    def keys(self, ref: str | int, **params: Any) -> httpx.Response:
        return self.client.get(f"/runs/{ref}/keys", params=_params(**params))

    def logs(self, ref: str | int, **params: Any) -> httpx.Response:
        return self.client.get(f"/runs/{ref}/logs", params=_params(**params))

    # -- asserting helpers -------------------------------------------------------------

    def create_ok(self, project: str, **fields: Any) -> Json:
        resp = self.create(project, **fields)
        assert resp.status_code in (200, 201), resp.text
        body: Json = resp.json()
        return body

    def get_ok(self, ref: str | int, project: str | None = None) -> Json:
        resp = self.get(ref, project)
        assert resp.status_code == 200, resp.text
        body: Json = resp.json()
        return body

    def ingest_ok(self, *chunks: Chunk) -> Json:
        resp = self.ingest(*chunks)
        assert resp.status_code == 200, resp.text
        body: Json = resp.json()
        return body

    def log(self, run: int, series: Mapping[str, Iterable[tuple[int, float]]],
            **kwargs: Any) -> Json:
        """Ingest one fresh chunk of points for ``run``."""
        return self.ingest_ok(chunk(run, series, **kwargs))

    def metrics(self, ref: str | int, **params: Any) -> MetricQueryResult:
        resp = self.metrics_raw(ref, msgpack=True, **params)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith(MSGPACK)
        return msgspec.msgpack.decode(resp.content, type=MetricQueryResult)

    def series(self, ref: str | int, key: str, **params: Any) -> list[MetricSeries]:
        return [s for s in self.metrics(ref, keys=[key], **params).series if s.key == key]

    def one_series(self, ref: str | int, key: str, **params: Any) -> MetricSeries:
        found = self.series(ref, key, **params)
        assert len(found) == 1, f"expected one series of {key!r}, got {found}"
        return found[0]


def _params(**params: Any) -> dict[str, Any]:
    """Query parameters without the ``None`` ones; booleans as ``true``/``false``."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if value is None:
            continue
        out[name] = str(value).lower() if isinstance(value, bool) else value
    return out


def all_at_once(count: int, action: Callable[[int], T]) -> list[T]:
    """Run ``action(i)`` for ``i < count`` in ``count`` threads released together."""
    barrier = threading.Barrier(count)

    def one(i: int) -> T:
        barrier.wait(timeout=30)
        return action(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def seed_lineage(
    api: Api,
    project: str,
    *,
    key: str = "loss",
    configs: Sequence[Json | None] = (None, None, None),
    tags: Sequence[list[str] | None] = (None, None, None),
) -> tuple[Json, Json, Json]:
    """The seed example of the issue, verbatim.

    A logs steps 0-100 (value = step); B forks A at 50 and logs 51-200
    (value = 1000 + step); C forks B at 150 and logs nothing yet.
    """
    a = api.create_ok(project, name="exp-a", config=configs[0], tags=tags[0])
    api.log(a["id"], {key: ramp(0, 100)})
    b = api.create_ok(project, name="exp-b", config=configs[1], tags=tags[1],
                      fork_run_id=str(a["id"]), fork_step=50)
    api.log(b["id"], {key: ramp(51, 200, lambda s: 1000.0 + s)})
    c = api.create_ok(project, name="exp-c", config=configs[2], tags=tags[2],
                      fork_run_id=b["display_id"], fork_step=150)
    assert b["forked_from"] == a["id"] and c["forked_from"] == b["id"]
    return a, b, c


def docs_page_assets(url: str) -> list[str]:
    """The /api/docs page's scripts, styles and icons, each checked to come from the server
    itself (an air-gapped cluster reaches no CDN) and to be there."""
    page = httpx.get(url + "/api/docs", timeout=30)
    assert page.status_code == 200 and "/api/openapi.json" in page.text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert len(assets) >= 3, page.text  # Swagger UI's script, its styles, the icon
    for asset in assets:
        assert asset.startswith("/api/docs/static/"), f"{asset} is not served by the server"
        answer = httpx.get(url + asset, timeout=30)
        assert answer.status_code == 200 and len(answer.content) > 1000, asset
    return assets
