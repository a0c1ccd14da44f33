"""``pluto server``: start the tracking server in the foreground."""

from __future__ import annotations

import logging

import uvicorn

from pluto_server import auth
from pluto_server.app import create_app
from pluto_server.database import Database
from pluto_server.settings import ServerSettings

log = logging.getLogger("pluto.server")


def serve(settings: ServerSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.effective_database_url,
                        sqlite_synchronous=settings.sqlite_synchronous)
    app = create_app(settings, database)
    if settings.auth_required:
        with database.read() as conn:
            if auth.count_keys(conn) == 0:
                log.warning(
                    "auth is on but no API key exists: create one with "
                    "'pluto keys create --name NAME %s'", _where(settings),
                )
    log.info("pluto server on %s (database: %s, auth: %s)", settings.base_url,
             database.dialect, "on" if settings.auth_required else "off")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=10)
    database.dispose()


def _where(settings: ServerSettings) -> str:
    if settings.database_url:
        return "--database-url ..."
    return f"--data-dir {settings.data_dir}"
