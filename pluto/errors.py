"""Errors the SDK raises: from ``init()`` and ``pluto.query`` only.

``log()``, ``finish()`` and friends never raise into training code; they warn.
"""

from __future__ import annotations


class PlutoError(Exception):
    """Base class of every error raised by pluto."""


class ServerUnavailable(PlutoError):
    """The tracking server could not be reached within the allowed time."""


class RequestRejected(PlutoError):
    """The server refused a request; the message says what to change."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{detail} (HTTP {status_code})")
        self.status_code = status_code
        self.detail = detail

    @property
    def permanent(self) -> bool:
        """A 4xx that retrying cannot fix (408 and 429 are worth retrying)."""
        return 400 <= self.status_code < 500 and self.status_code not in (408, 429)

    @property
    def credentials_refused(self) -> bool:
        """401: the API key is missing or refused. Permanent for this key, but nothing is
        wrong with what was sent: spooled data that meets it is kept and sent again (once
        the key is fixed), never set aside as refused."""
        return self.status_code == 401

    @property
    def data_refused(self) -> bool:
        """The server refuses what was sent, for good: retrying it cannot help."""
        return self.permanent and not self.credentials_refused
