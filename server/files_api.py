"""The HTTP routes of files and checkpoints (see ``transfers.py`` and docs/api.md).

Uploads are three steps so that nothing half-written is ever listed: ask which blobs
the server lacks, stream those raw (``PUT .../blobs/{sha256}``), commit the manifest.
Downloads stream a file's bytes with its SHA-256 in ``x-content-sha256``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from pluto.digits import parse_digits
from pluto.wire import (
    API_PREFIX,
    SHA256_HEADER,
    BlobCheck,
    BlobsMissing,
    BlobStored,
    CheckpointCreate,
    CheckpointFork,
    CheckpointInfo,
    CheckpointList,
    FileCreate,
    FileEntry,
    FileInfo,
    FileList,
)
from pluto_server import openapi
from pluto_server.bodies import decode, read_body
from pluto_server.errors import BadRequest
from pluto_server.ingest import INT64_MAX
from pluto_server.routing import ProjectParam, Who, reply
from pluto_server.transfers import Transfers

RUN = f"{API_PREFIX}/runs/{{ref}}"
StepParam = Annotated[int | None, Query(ge=0, le=INT64_MAX)]

_RAW_UPLOAD: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
}
_RAW_DOWNLOAD: dict[str, Any] = {
    "responses": {"200": {"description": "the file's bytes; x-content-sha256 has their digest",
                          "content": {"application/octet-stream": {
                              "schema": {"type": "string", "format": "binary"}}}}},
}


def install(app: FastAPI, transfers: Transfers, max_body_bytes: int) -> None:
    @app.post(f"{RUN}/blobs/missing", tags=["files"],
              openapi_extra=openapi.route(body=BlobCheck, reply=BlobsMissing))
    async def missing_blobs(request: Request, ref: str, who: Who,
                            project: ProjectParam = None) -> Response:
        """Which of these SHA-256 digests the server has no bytes for yet."""
        req = decode(request, await read_body(request, max_body_bytes), BlobCheck)
        return reply(request, await transfers.missing(ref, project, who, req.sha256))

    @app.put(f"{RUN}/blobs/{{sha256}}", tags=["files"],
             openapi_extra={**_RAW_UPLOAD, **openapi.route(reply=BlobStored, statuses=(201,))})
    async def upload_blob(request: Request, ref: str, sha256: str, who: Who,
                          project: ProjectParam = None) -> Response:
        """Stream a file's bytes; kept only if they hash to ``sha256``."""
        size = parse_digits(request.headers.get("content-length"))
        if request.headers.get("content-encoding", "identity") != "identity":
            raise BadRequest("send blob bytes without content-encoding: they are hashed as sent")
        try:
            stored = await transfers.upload(ref, project, who, sha256, size, request.stream())
        except ClientDisconnect:  # nothing was kept; the client is gone and retries
            raise BadRequest("the upload was cut short before all bytes arrived") from None
        return reply(request, stored, status=201)

    @app.post(f"{RUN}/checkpoints", tags=["checkpoints"],
              openapi_extra=openapi.route(body=CheckpointCreate, reply=CheckpointInfo,
                                          statuses=(200, 201)))
    async def commit_checkpoint(request: Request, ref: str, who: Who,
                                project: ProjectParam = None) -> Response:
        """Commit a checkpoint whose blobs are uploaded; listed from then on."""
        req = decode(request, await read_body(request, max_body_bytes), CheckpointCreate)
        info, created = await transfers.commit(ref, project, who, req)
        return reply(request, info, status=201 if created else 200)

    @app.get(f"{RUN}/checkpoints", tags=["checkpoints"],
             openapi_extra=openapi.route(reply=CheckpointList))
    async def list_checkpoints(
        request: Request, ref: str, who: Who, project: ProjectParam = None,
        lineage: Annotated[bool, Query(
            description="every checkpoint a fork of this run could start from")] = False,
    ) -> Response:
        return reply(request, await transfers.list(ref, project, who, lineage))

    @app.get(f"{RUN}/checkpoints/resolve", tags=["checkpoints"],
             openapi_extra=openapi.route(reply=CheckpointInfo))
    async def resolve_checkpoint(request: Request, ref: str, who: Who,
                                 project: ProjectParam = None,
                                 not_after_step: StepParam = None,
                                 step: StepParam = None) -> Response:
        """The newest checkpoint of the run's lineage at or before a step (or at one)."""
        return reply(request, await transfers.resolve(ref, project, who,
                                                      not_after_step=not_after_step, step=step))

    @app.post(f"{RUN}/checkpoints/fork", tags=["checkpoints"],
              openapi_extra=openapi.route(body=CheckpointFork, reply=CheckpointInfo,
                                          statuses=(200, 201)))
    async def fork_checkpoint(request: Request, ref: str, who: Who,
                              project: ProjectParam = None) -> Response:
        """Copy another run's (or an ART bucket's) checkpoint to this run, same step."""
        req = decode(request, await read_body(request, max_body_bytes), CheckpointFork)
        info, created = await transfers.fork(ref, project, who, req)
        return reply(request, info, status=201 if created else 200)

    @app.get(f"{RUN}/checkpoints/{{step}}/files/{{path:path}}", tags=["checkpoints"],
             openapi_extra=_RAW_DOWNLOAD)
    async def checkpoint_file(ref: str, step: Annotated[int, Path(ge=0, le=INT64_MAX)],
                              path: str, who: Who,
                              project: ProjectParam = None) -> Response:
        entry, chunks = await transfers.checkpoint_file(ref, project, who, step, path)
        return _download(entry, chunks)

    @app.post(f"{RUN}/files", tags=["files"],
              openapi_extra=openapi.route(body=FileCreate, reply=FileInfo, statuses=(200, 201)))
    async def commit_file(request: Request, ref: str, who: Who,
                          project: ProjectParam = None) -> Response:
        req = decode(request, await read_body(request, max_body_bytes), FileCreate)
        info, created = await transfers.commit_file(ref, project, who, req)
        return reply(request, info, status=201 if created else 200)

    @app.get(f"{RUN}/files", tags=["files"], openapi_extra=openapi.route(reply=FileList))
    async def list_files(request: Request, ref: str, who: Who,
                         project: ProjectParam = None) -> Response:
        return reply(request, await transfers.list_files(ref, project, who))

    @app.get(f"{RUN}/files/{{name:path}}", tags=["files"], openapi_extra=_RAW_DOWNLOAD)
    async def download_file(ref: str, name: str, who: Who,
                            project: ProjectParam = None) -> Response:
        entry, chunks = await transfers.file(ref, project, who, name)
        return _download(entry, chunks)


def _download(entry: FileEntry, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    filename = quote(entry.path.rsplit("/", 1)[-1])
    return StreamingResponse(chunks, media_type="application/octet-stream", headers={
        "content-length": str(entry.size),
        SHA256_HEADER: entry.sha256,
        "content-disposition": f"attachment; filename*=UTF-8''{filename}",
    })
