"""Test support: real PostgreSQL clusters and real ``pluto server`` processes.

Nothing here is a mock. Both helpers start real processes on 127.0.0.1, on free
ports, in temporary directories, and stop exactly the processes they started.
"""

from .postgres import (
    PostgresCluster,
    PostgresNotFound,
    PostgresStartError,
    find_postgres_bindir,
    free_port,
    libpq_url,
    start_cluster,
)
from .server_process import HEALTH_PATH, ServerProcess, ServerStartError, clean_env, env_for

__all__ = [
    "HEALTH_PATH",
    "PostgresCluster",
    "PostgresNotFound",
    "PostgresStartError",
    "ServerProcess",
    "ServerStartError",
    "clean_env",
    "env_for",
    "find_postgres_bindir",
    "free_port",
    "libpq_url",
    "start_cluster",
]
