"""The web dashboard: one ``index.html`` for every page route, static assets, Plotly.

The dashboard is a small single-page app (``static/``) that reads only the public JSON
API under ``/api/v1``: no private side door, so what it shows is what any client can
get. Every asset is served by this server, Plotly included (straight from the
installed ``plotly`` package, never from a CDN), so it works on an air-gapped cluster.

Caching: assets may be cached for a while (``/static/...``); ``index.html`` is never
cached, so a server upgrade reaches every browser on its next page load.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "index.html"

#: Page routes: each answers with ``index.html``; the JS router reads the path.
#: An experiment is a run name, which may hold "/" (``gpt/small``, linked as ``gpt%2Fsmall``):
#: Starlette matches the decoded path, so that route takes the rest of it (``:path``).
#: Nothing else lives under ``/projects/{project}/experiments/``; project names and display
#: ids never hold "/".
PAGE_ROUTES = (
    "/",
    "/projects/{project}",
    "/projects/{project}/runs/{display_id}",
    "/projects/{project}/experiments/{name:path}",
    "/compare",
)

ASSET_CACHE = "public, max-age=300"
VENDOR_CACHE = "public, max-age=86400"
NO_CACHE = "no-cache, no-store, must-revalidate"


class _CachedStatic(StaticFiles):
    """StaticFiles with a ``cache-control`` header on every answer."""

    def __init__(self, *, directory: Path, cache_control: str) -> None:
        super().__init__(directory=directory)
        self._cache_control = cache_control

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = self._cache_control
        return response


def plotly_js() -> Path | None:
    """``plotly.min.js`` of the installed ``plotly`` package, or None when it is missing."""
    try:
        resource = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
    except ModuleNotFoundError:
        return None
    path = Path(str(resource))
    return path if path.is_file() else None


def install(app: FastAPI) -> None:
    """Add the page routes, ``/static/`` and ``/static/vendor/plotly.min.js`` to ``app``.

    Call it after the API routes: ``/api/...`` is matched first.
    """

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly() -> Response:
        path = plotly_js()
        if path is None:
            return PlainTextResponse(
                "plotly is not installed on the server: pip install 'pluto-k8s[server]'",
                status_code=404)
        return FileResponse(path, media_type="text/javascript",
                            headers={"cache-control": VENDOR_CACHE})

    app.mount("/static", _CachedStatic(directory=STATIC_DIR, cache_control=ASSET_CACHE),
              name="static")

    def index() -> Response:
        return FileResponse(INDEX, media_type="text/html",
                            headers={"cache-control": NO_CACHE})

    for route in PAGE_ROUTES:
        app.add_api_route(route, index, methods=["GET"], include_in_schema=False)


__all__ = ["PAGE_ROUTES", "STATIC_DIR", "install", "plotly_js"]
