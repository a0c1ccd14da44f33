"""What every route shares: the caller's identity, the project parameter, the reply."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.responses import Response

from pluto.wire import JSON, MSGPACK, encode_json, encode_msgpack
from pluto_server.auth import KeyIdentity
from pluto_server.bodies import wants_msgpack
from pluto_server.service import Service

ProjectParam = Annotated[str | None, Query(description="project of a display or external id")]


def identity(request: Request) -> KeyIdentity | None:
    """The caller's API key (``Authorization: Bearer`` or ``X-API-Key``), when auth is on."""
    header = request.headers.get("authorization", "")
    presented = header[7:].strip() if header.lower().startswith("bearer ") else None
    presented = presented or request.headers.get("x-api-key")
    service: Service = request.app.state.service
    return service.authenticate(presented)


Who = Annotated[KeyIdentity | None, Depends(identity)]


def reply(request: Request, body: Any, status: int = 200) -> Response:
    if wants_msgpack(request):
        return Response(encode_msgpack(body), status_code=status, media_type=MSGPACK)
    return Response(encode_json(body), status_code=status, media_type=JSON)
