"""An API key that follows the file it came from: the sidecar's and the operator's.

Given as ``PLUTO_API_KEY`` it is fixed for the life of the process. Given as a file
(``--api-key-file``, a mounted Secret) it follows the file: the kubelet rewrites a
mounted Secret's files when the Secret changes, so a rotated key is used without a
restart. The file is looked at (one ``stat``) before each request and read again when
it changed; one that is missing at the start (``--api-key-optional``: a Secret mounted
with ``optional: true`` that does not exist) is used from when it appears. In the
sidecar, nothing spooled while the key was refused is set aside: a 401 is about the key,
never about the data (see ``pluto_sidecar.forwarder``).

The events are logged with their fields in ``extra={"fields": ...}``, the convention of
the sidecar's JSON logs (``pluto_sidecar.logs``); elsewhere the message alone shows.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pluto.errors import PlutoError

__all__ = ["ApiKey", "api_key_from_flags"]

log = logging.getLogger("pluto.credentials")


class ApiKey:
    """The key to send, read again from ``file`` (when given) whenever the file changed."""

    def __init__(self, value: str | None, file: Path | None = None) -> None:
        self._value = value or None
        self.file = file
        self._seen = self._identity()
        #: ``(identity,)`` of the file when it last could not be read (None: read since):
        #: warned about once, not at every request while it stays so (a deleted Secret's
        #: file is gone for good, and its identity is None).
        self._unreadable: tuple[tuple[int, int, int] | None] | None = None
        #: The operator's handlers run in threads: one of them reads a changed file.
        self._reloading = threading.Lock()

    @property
    def value(self) -> str | None:
        """The key as last read (without looking at the file again)."""
        return self._value

    @property
    def authorization(self) -> str | None:
        """The ``authorization`` header value, None without a key."""
        if self.file is not None and self._identity() != self._seen:
            with self._reloading:
                if self._identity() != self._seen:
                    self._reload()
        return f"Bearer {self._value}" if self._value else None

    def _identity(self) -> tuple[int, int, int] | None:
        """What tells a rewritten file from the one read last (the kubelet swaps a
        Secret's files in by a symlink, so the inode changes too)."""
        if self.file is None:
            return None
        try:
            stat = self.file.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _reload(self) -> None:
        """Read the key file again. When it cannot be read (the kubelet swaps a Secret's
        files by renaming a folder, so a read can fall between the two), the key in use
        stays and the next request looks again."""
        assert self.file is not None
        identity = self._identity()
        try:
            value = self.file.read_text().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            if self._unreadable != (identity,):
                self._unreadable = (identity,)
                log.warning("cannot read the API key file again; the key in use stays",
                            extra={"fields": {"file": str(self.file),
                                              "error": exc.__class__.__name__}})
            return
        self._seen, self._unreadable = identity, None
        if value != self._value:
            self._value = value
            log.info("API key read again from its file: it changed",
                     extra={"fields": {"file": str(self.file)}})


def api_key_from_flags(env_value: str | None, file: Path | None, optional: bool) -> ApiKey:
    """The key of a process given ``PLUTO_API_KEY`` (``env_value``), ``--api-key-file``
    and ``--api-key-optional``: the file wins over the variable. A file that cannot be read
    at the start is an error, unless it is optional and missing (a Secret mounted with
    ``optional: true`` that does not exist yet): then there is no key until it appears."""
    if optional and file is None:
        raise PlutoError("--api-key-optional says what to do when the --api-key-file is "
                         "missing: give --api-key-file too, or leave it out")
    value = env_value
    if file is not None and (file.exists() or not optional):
        try:
            value = file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise PlutoError(f"--api-key-file {file}: cannot read the API key from it "
                             f"({reason}); give the path of the file that holds it (the "
                             "mounted Secret), or set PLUTO_API_KEY instead") from None
    return ApiKey(value, file)
