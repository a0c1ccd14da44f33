"""``pluto server``: start the tracking server in the foreground."""

from __future__ import annotations

import logging

import uvicorn

from pluto._malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt
from pluto_server import auth
from pluto_server.app import create_app
from pluto_server.database import Database
from pluto_server.settings import ServerSettings

log = logging.getLogger("pluto.server")

#: glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD as the server sets them.
MMAP_THRESHOLD_BYTES = 64 * 2**20
TRIM_THRESHOLD_BYTES = 128 * 2**20


def tune_malloc() -> tuple[bool, bool]:
    """Keep the memory a query frees in the heap for the next query.

    A metric query's big buffers (blobs, columns of 8 MB at 1e6 points) live for one
    request. By default glibc maps each on its own and unmaps it when freed, or trims the
    heap top, so every request faults its memory in again: half of a 1e6-point query's
    time (docs/benchmarks.md, "Stitched lineage queries"). Buffers up to 64 MiB (the most a
    thread's heap holds) now come from the heap, and up to 128 MiB of free heap top stay;
    the cost is an RSS that stays near the largest such query's peak (about 190 MB after a
    1e6-point query, against 117 MB). Bigger buffers are still mapped and given back. Each
    option is left alone where its ``MALLOC_*_`` variable or ``GLIBC_TUNABLES`` entry is
    set (the operator's choice wins), and off glibc. The sidecar does the opposite
    (``pluto_sidecar.main.tune_malloc``): its buffers are few and its memory is the pod's.
    """
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def serve(settings: ServerSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tune_malloc()
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
    if settings.public_url_warning:
        log.warning("%s", settings.public_url_warning)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=10)
    database.dispose()


def _where(settings: ServerSettings) -> str:
    if settings.database_url:
        return "--database-url ..."
    return f"--data-dir {settings.data_dir}"
