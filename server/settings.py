"""Server settings, from flags (see ``pluto server --help``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from pluto_server.database import sqlite_url

DEFAULT_PORT = 7300
DEFAULT_DATA_DIR = Path(".pluto-data")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR)
    database_url: str | None = None
    auth: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    public_url: str | None = None
    sqlite_synchronous: str = "FULL"
    #: Where file and checkpoint bytes go: a directory, ``file:///DIR`` or
    #: ``s3://BUCKET/PREFIX``; default ``<data_dir>/files``.
    storage: str | None = None
    #: S3 endpoint and region (else the AWS variables boto3 reads, e.g. AWS_ENDPOINT_URL).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @property
    def effective_storage(self) -> str:
        return self.storage or str(self.data_dir.resolve() / "files")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir.resolve())

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def auth_required(self) -> bool:
        """Auth is on when asked for, and always when reachable beyond this machine."""
        return self.auth or not self.loopback_only

    @property
    def wildcard_host(self) -> bool:
        """Listening on every address (``0.0.0.0``, ``::``): no one address to link to."""
        try:
            return self.host == "" or ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            return False

    @property
    def base_url(self) -> str:
        """The start of run links: ``--public-url``, else the address the server listens on
        (an IPv6 literal in brackets), else, listening on every address, 127.0.0.1."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.wildcard_host:
            return f"http://127.0.0.1:{self.port}"
        host = self.host
        if ":" in host:  # an IPv6 literal; a zone ("fe80::1%eth0") is written %25 in a URL
            host = "[" + host.replace("%", "%25") + "]"
        return f"http://{host}:{self.port}"

    @property
    def public_url_warning(self) -> str | None:
        """What to log at start when run links are a guess that works only on this machine."""
        if self.public_url or not self.wildcard_host:
            return None
        return (f"run links will read {self.base_url}, which works only on this machine: "
                "pass --public-url with the URL users reach this server at")
