"""OpenAPI for routes whose bodies are msgspec structs from ``pluto.wire``.

FastAPI documents pydantic models by itself; our bodies are msgspec structs
(one codec for SDK, sidecar and server), so each route declares its body and
answer here and the schemas are merged into the document.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pluto.wire import JSON, MSGPACK, ApiError, IngestBatch, JsonIngestBatch

REF = "#/components/schemas/{name}"
_registered: set[type[Any]] = {ApiError}


def _ref(kind: type[Any]) -> dict[str, Any]:
    _registered.add(kind)
    return {"$ref": REF.format(name=kind.__name__)}


def route(
    *,
    body: type[Any] | None = None,
    reply: type[Any] | None = None,
    msgpack: bool = False,
    statuses: tuple[int, ...] = (200,),
) -> dict[str, Any]:
    """``openapi_extra`` for one route."""
    extra: dict[str, Any] = {}
    media = [JSON, MSGPACK] if msgpack else [JSON]
    if body is not None:
        content = {m: {"schema": _ref(body)} for m in media}
        if body is IngestBatch:  # as JSON, NaN and Infinity travel as strings
            content[JSON] = {"schema": _ref(JsonIngestBatch)}
        extra["requestBody"] = {"required": True, "content": content}
    responses: dict[str, Any] = {}
    if reply is not None:
        for status in statuses:
            responses[str(status)] = {
                "description": "Created" if status == 201 else "OK",
                "content": {m: {"schema": _ref(reply)} for m in media},
            }
    extra["responses"] = responses
    return extra


#: The answers any route may give besides its own (server.errors; every one an ``ApiError``
#: body). Declared on every operation by ``install``, so that routes FastAPI documents by
#: itself (files, checkpoints, the dashboard's API) say the same as those declared here.
ERRORS = (
    ("400", "Bad request"), ("401", "API key missing or refused"),
    ("403", "The API key may not reach this project"), ("404", "Not found"),
    ("409", "Conflicts with the current state"), ("413", "Body too large"),
    ("422", "Invalid body or parameters"),
)


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description=app.description)
        error = {"content": {JSON: {"schema": _ref(ApiError)}}}
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for code, text in ERRORS:
                    # Replaces FastAPI's own 422 (a list of pydantic errors): this server
                    # answers every error as {"detail": "what to change"}.
                    responses[code] = {"description": text, **error}
        _, components = msgspec.json.schema_components(sorted(_registered, key=str),
                                                        ref_template=REF)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas.update(components)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
