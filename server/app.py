"""The HTTP API: thin routes over ``Service``; bodies are ``pluto.wire`` structs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline

import pluto_server
from pluto._gc import freeze_start_up_objects
from pluto.wire import (
    API_PREFIX,
    JSON,
    MSGPACK,
    IngestBatch,
    IngestResult,
    JsonIngestBatch,
    Lineage,
    LogPage,
    MetricKeys,
    MetricQueryResult,
    ProjectList,
    RunAttached,
    RunCreate,
    RunFinish,
    RunInfo,
    RunList,
    RunUpdate,
    encode_json,
    encode_msgpack,
    json_float,
)
from pluto_server import dashboard, files_api, openapi
from pluto_server.blobs import BlobError, BlobStore, S3Options, open_store
from pluto_server.bodies import decode, read_body, wants_msgpack
from pluto_server.columns import PackedIngestBatch
from pluto_server.database import Database
from pluto_server.errors import ApiError
from pluto_server.ingest import INT32_MAX, INT64_MAX
from pluto_server.middleware import (
    AdvertiseRequestEncodings,
    CompressAnswers,
    RefuseNulInUrls,
)
from pluto_server.queries import MetricQuery
from pluto_server.routing import ProjectParam, Who, reply
from pluto_server.runs import MAX_RUN_PAGE
from pluto_server.service import Service
from pluto_server.settings import ServerSettings
from pluto_server.transfers import Transfers

log = logging.getLogger("pluto.server")

#: Where the files of the /api/docs page (Swagger UI) are served.
API_DOCS_STATIC = "/api/docs/static"



def create_app(settings: ServerSettings, database: Database | None = None) -> FastAPI:
    database = database or Database(settings.effective_database_url,
                                    sqlite_synchronous=settings.sqlite_synchronous)
    database.migrate()
    service = Service(settings, database)
    store = open_store(settings.effective_storage,
                       S3Options(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _check_storage(store)
        # Everything made so far lives as long as the server: out of the collector's walks
        # (a full collection took 50-80 ms, in the middle of whatever queries were running).
        log.info("start-up objects frozen out of the garbage collector's walks: %d",
                 freeze_start_up_objects())
        yield
        await store.close()

    # FastAPI's /api/docs page loads Swagger UI from a CDN, which an air-gapped cluster
    # cannot reach: fastapi-offline's page is the same, its files served from here.
    app = FastAPIOffline(
        lifespan=lifespan,
        title="Pluto tracking server",
        version=pluto_server.__version__,
        description="Runs, forks and lineage, metrics and logs of multi-node PyTorch training.",
        docs_url="/api/docs",
        static_url=API_DOCS_STATIC,
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.service = service
    transfers = Transfers(service, store, S3Options(endpoint_url=settings.s3_endpoint_url,
                                                    region=settings.s3_region))
    _install_error_handlers(app)
    app.add_middleware(RefuseNulInUrls)
    app.add_middleware(AdvertiseRequestEncodings)
    app.add_middleware(CompressAnswers)
    files_api.install(app, transfers, settings.max_body_bytes)
    openapi.install(app)

    @app.get(f"{API_PREFIX}/health", tags=["server"])
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": pluto_server.__version__,
            "database": database.dialect,
            "schema": database.schema_revision(),
            "auth": settings.auth_required,
            "storage": store.url,
        }

    @app.post(f"{API_PREFIX}/runs", tags=["runs"],
              openapi_extra=openapi.route(body=RunCreate, reply=RunAttached,
                                          statuses=(200, 201)))
    async def create_run(request: Request, who: Who) -> Response:
        """Create a run, or attach to the one with the same (project, run_id)."""
        req = decode(request, await read_body(request, settings.max_body_bytes), RunCreate)
        run = await run_in_threadpool(service.create_run, req, who)
        return reply(request, run, status=200 if run.resumed else 201)

    @app.get(f"{API_PREFIX}/projects", tags=["projects"],
             openapi_extra=openapi.route(reply=ProjectList))
    def list_projects(request: Request, who: Who) -> Response:
        return reply(request, service.list_projects(who))

    @app.get(f"{API_PREFIX}/projects/{{project}}/runs", tags=["projects"],
             openapi_extra=openapi.route(reply=RunList))
    def list_runs(request: Request, project: str, who: Who,
                  metrics: Annotated[list[str] | None, Query(
                      description="fill last_values with these metrics' latest values")]
                  = None,
                  limit: Annotated[int, Query(
                      ge=1, le=MAX_RUN_PAGE, description="runs in this page, newest first")]
                  = MAX_RUN_PAGE,
                  cursor: Annotated[str | None, Query(
                      max_length=40, description="the next_cursor of the page before")]
                  = None,
                  run_id: Annotated[str | None, Query(
                      max_length=256, description="only the run with this external id (a "
                      "ref that cannot be mistaken for a numeric or display id)")]
                  = None) -> Response:
        """A project's runs, newest first, a page at a time: follow ``next_cursor`` (or the
        ``Link: <...>; rel="next"`` header) until it is null."""
        page = service.list_runs(project, who, metrics, limit=limit, cursor=cursor,
                                 external_id=run_id)
        response = reply(request, page)
        if page.next_cursor is not None:
            # Relative (RFC 8288 resolves it against the request): right behind a proxy too.
            following = request.url.include_query_params(cursor=page.next_cursor)
            response.headers["link"] = f'<{following.path}?{following.query}>; rel="next"'
        return response

    @app.get(f"{API_PREFIX}/runs/{{ref}}", tags=["runs"],
             openapi_extra=openapi.route(reply=RunInfo))
    def get_run(request: Request, ref: str, who: Who, project: ProjectParam = None) -> Response:
        """A run by numeric id, display id (``MMP-42``) or external id."""
        return reply(request, service.get_run(ref, project, who))

    @app.patch(f"{API_PREFIX}/runs/{{ref}}", tags=["runs"],
               openapi_extra=openapi.route(body=RunUpdate, reply=RunInfo))
    async def update_run(request: Request, ref: str, who: Who,
                         project: ProjectParam = None) -> Response:
        req = decode(request, await read_body(request, settings.max_body_bytes), RunUpdate)
        return reply(request, await run_in_threadpool(service.update_run, ref, project, req,
                                                       who))

    @app.post(f"{API_PREFIX}/runs/{{ref}}/finish", tags=["runs"],
              openapi_extra=openapi.route(body=RunFinish, reply=RunInfo))
    async def finish_run(request: Request, ref: str, who: Who,
                         project: ProjectParam = None) -> Response:
        req = decode(request, await read_body(request, settings.max_body_bytes), RunFinish)
        return reply(request, await run_in_threadpool(service.finish_run, ref, project, req,
                                                       who))

    @app.get(f"{API_PREFIX}/runs/{{ref}}/lineage", tags=["runs"],
             openapi_extra=openapi.route(reply=Lineage))
    def get_lineage(request: Request, ref: str, who: Who,
                    project: ProjectParam = None) -> Response:
        return reply(request, service.lineage(ref, project, who))

    @app.post(f"{API_PREFIX}/ingest", tags=["data"],
              openapi_extra=openapi.route(body=IngestBatch, reply=IngestResult, msgpack=True))
    async def ingest(request: Request, who: Who) -> Response:
        """Apply chunks of points and console lines, each exactly once."""
        body = await read_body(request, settings.max_body_bytes)
        if request.headers.get("content-type", "").startswith(MSGPACK):
            # The documented IngestBatch, its point columns left for numpy to read.
            batch: IngestBatch | PackedIngestBatch = decode(request, body, PackedIngestBatch,
                                                            "IngestBatch")
        else:  # JSON spells NaN and Infinity as strings
            batch = decode(request, body, JsonIngestBatch, "IngestBatch").to_batch()
        return reply(request, await run_in_threadpool(service.ingest, batch, who))

    @app.get(f"{API_PREFIX}/runs/{{ref}}/metrics", tags=["data"],
             openapi_extra=openapi.route(reply=MetricQueryResult, msgpack=True))
    def get_metrics(
        request: Request,
        ref: str,
        who: Who,
        project: ProjectParam = None,
        keys: Annotated[list[str] | None, Query(description="metric keys; all when omitted")]
        = None,
        lineage: Annotated[bool, Query(description="stitch the ancestors' points in")] = False,
        writer: Annotated[int | None, Query(ge=0, le=INT32_MAX,
                                            description="only this writer (rank)")] = None,
        aggregate: Annotated[Literal["none", "mean"], Query(
            description="'none': a series per writer; 'mean': averaged across writers")] = "none",
        buckets: Annotated[int | None, Query(ge=1, le=100_000,
                                             description="downsample to N buckets")] = None,
        step_min: Annotated[int | None, Query(ge=-INT64_MAX - 1, le=INT64_MAX)] = None,
        step_max: Annotated[int | None, Query(ge=-INT64_MAX - 1, le=INT64_MAX)] = None,
    ) -> Response:
        query = MetricQuery(run_id=0, keys=keys, lineage=lineage, writer=writer,
                            aggregate=aggregate, buckets=buckets, step_min=step_min,
                            step_max=step_max)
        result = service.metrics(ref, project, query, who)
        if wants_msgpack(request):
            return Response(encode_msgpack(result), media_type=MSGPACK)
        return Response(encode_json(_json_safe(result)), media_type=JSON)

    @app.get(f"{API_PREFIX}/runs/{{ref}}/keys", tags=["data"],
             openapi_extra=openapi.route(reply=MetricKeys))
    def get_keys(request: Request, ref: str, who: Who, project: ProjectParam = None,
                 lineage: bool = False) -> Response:
        return reply(request, service.metric_keys(ref, project, lineage, who))

    @app.get(f"{API_PREFIX}/runs/{{ref}}/logs", tags=["data"],
             openapi_extra=openapi.route(reply=LogPage))
    def get_logs(
        request: Request,
        ref: str,
        who: Who,
        project: ProjectParam = None,
        after: Annotated[int | None, Query(ge=0, le=INT64_MAX,
                                           description="only lines after this id")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        writer: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
        q: Annotated[str | None, Query(max_length=200, description="substring to find")] = None,
    ) -> Response:
        page = service.logs(ref, project, who, after=after, limit=limit, writer=writer,
                            contains=q)
        return reply(request, page)

    dashboard.install(app)  # after the API routes: /api/... wins
    return app


FLOAT_FIELDS = ("values", "mins", "maxs", "means")


def _json_safe(result: MetricQueryResult) -> dict[str, Any]:
    """JSON cannot carry NaN or Infinity: they become the strings "NaN", "Infinity"."""
    encoded: dict[str, Any] = msgspec.to_builtins(result)
    for series in encoded["series"]:
        for name in FLOAT_FIELDS:
            series[name] = [json_float(v) for v in series[name]]
    return encoded


async def _check_storage(store: BlobStore) -> None:
    """Say at start when the storage refuses or cannot be reached; serve anyway (runs and
    metrics do not need it, and it may come back)."""
    try:
        await store.list(".probe/")  # listing, unlike a HEAD, tells a missing bucket apart
    except BlobError as exc:
        log.error("file and checkpoint storage %s is not usable: %s", store.url, exc)
    else:
        log.info("file and checkpoint storage: %s", store.url)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return Response(encode_json({"detail": exc.detail}), status_code=exc.status_code,
                        media_type=JSON)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg')}"
            for error in exc.errors()
        )
        return Response(encode_json({"detail": f"invalid parameters: {problems}"}),
                        status_code=422, media_type=JSON)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return Response(
            encode_json({"detail": "internal server error; the server log has the details"}),
            status_code=500, media_type=JSON,
        )


__all__ = ["create_app"]
