"""Structured logs for the sidecar: one JSON object per line on stderr, and no secrets.

Every module logs through a child of the ``pluto.sidecar`` logger
(``logging.getLogger("pluto.sidecar.spool")``), and :func:`configure` (called once by the
sidecar's entry point) makes that tree print lines like::

    {"ts": "2025-01-31T12:00:00.123Z", "level": "info", "logger": "pluto.sidecar.spool",
     "event": "spool recovered", "records": 3, "torn_bytes": 0}

(one line in reality). The convention for fields is :func:`log_event`::

    log_event(log, "spool recovered", records=3, torn_bytes=0)
    log_event(log, "send failed", level=logging.WARNING, exc_info=True, attempt=4)

which is shorthand for ``log.info("spool recovered", extra={"fields": {...}})``; both work.
Plain ``log.info("listening on %s", path)`` works too (the formatted message is the event).

Secrets: a field whose name contains ``key``, ``token``, ``secret`` or ``password``
(case-insensitive, at any depth of nested dicts) is written as ``"[redacted]"``; so name an
idempotency key ``idem``, not ``idempotency_key``, if its value should show. Free text (the
event, string values, exception messages and tracebacks) is scrubbed of the common shapes of
inline credentials: ``Bearer <x>``, ``api_key=<x>`` / ``"token": "<x>"``, and the password of
``scheme://user:password@host``.

Exceptions (``exc_info``) add ``"error": "<Type>: <message>"`` and a ``"traceback"`` string.
A field whose name collides with a key the formatter writes itself (``ts``, ``level``,
``logger``, ``event``; and ``error``/``traceback`` when there is an exception) is written with
a leading underscore instead of overwriting it; ``error="..."`` without an exception is kept.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "COVERED_LOGGERS", "LOGGER_NAME", "REDACTED", "JsonFormatter", "configure", "log_event",
    "redact", "scrub",
]

LOGGER_NAME = "pluto.sidecar"
REDACTED = "[redacted]"

_SECRET_NAME = re.compile(r"key|token|secret|password", re.IGNORECASE)
_RESERVED = frozenset({"ts", "level", "logger", "event"})
_SCRUBS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (
        re.compile(
            r"""(?ix)
            ( [\w-]*(?:key|token|secret|password)[\w-]* )  # a secret-looking name
            ( ["']?\s*[=:]\s*["']? )                       # = or : with optional quotes
            ( [^\s"'&,;}]+ )                               # the value
            """
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), rf"\1{REDACTED}@"),
)


def scrub(text: str) -> str:
    """``text`` with inline credentials (bearer tokens, ``key=...``, URL passwords) masked."""
    for pattern, replacement in _SCRUBS:
        text = pattern.sub(replacement, text)
    return text


def redact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with secret-named entries masked and free text scrubbed."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if _SECRET_NAME.search(str(name)):
            out[str(name)] = REDACTED
        else:
            out[str(name)] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return value


def _json_default(value: object) -> str:
    return scrub(str(value))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; see the module docstring for its shape."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": scrub(record.getMessage()),
        }
        extra: dict[str, Any] = {}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            extra["error"] = scrub(f"{type(exc).__name__}: {exc}")
            extra["traceback"] = scrub(
                "".join(traceback.format_exception(*record.exc_info)).rstrip()
            )
        if record.stack_info:
            extra["stack"] = scrub(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            taken = _RESERVED | extra.keys()
            for name, value in redact(fields).items():
                entry[f"_{name}" if name in taken else name] = value
        entry.update(extra)
        # ensure_ascii keeps each entry one line whatever the text holds (\u2028 included).
        return json.dumps(entry, default=_json_default, ensure_ascii=True)


class _Handler(logging.Handler):
    """Writes to ``stream``, or to whatever ``sys.stderr`` is at the time of each record
    (so redirecting stderr later, as pytest's capsys does, is honoured)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self._stream if self._stream is not None else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


#: Loggers outside the ``pluto.sidecar`` tree that log in the sidecar's process, printed
#: the same way: the SDK modules it runs (``pluto.spool``: a cursor it could not save, a
#: volume with room again), and Python warnings (``configure`` routes them to logging).
COVERED_LOGGERS = (LOGGER_NAME, "pluto", "py.warnings")


def configure(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Make every line the sidecar logs a JSON line: the ``pluto.sidecar`` tree at ``level``
    and above, and the rest of :data:`COVERED_LOGGERS` too.

    ``level`` is a logging level name, any case (``"debug"``, ``"INFO"``, ...). Output goes to
    ``stream`` or, by default, stderr. Idempotent: calling it again replaces the handler it
    installed before. These loggers stop propagating to the root logger, so a root handler set
    up by some library does not print every line a second time in another format. Anything
    else that reaches the root logger (asyncio's own errors, a library's warning) is printed as
    JSON too, at WARNING and above (below that, libraries such as httpx log every request).
    """
    numeric = logging.getLevelName(level.strip().upper())
    if not isinstance(numeric, int):
        raise ValueError(
            f"unknown log level {level!r}: use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter())
    for name in COVERED_LOGGERS:
        logger = logging.getLogger(name)
        _replace_handler(logger, handler)
        logger.setLevel(numeric)
        logger.propagate = False
    root = logging.getLogger()
    _replace_handler(root, handler)
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn of the SDK modules it runs, to py.warnings


def _replace_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)


def log_event(
    logger: logging.Logger,
    event: str,
    /,
    *,
    level: int = logging.INFO,
    exc_info: bool | BaseException | None = None,
    **fields: Any,
) -> None:
    """Log ``event`` with structured ``fields`` (see the module docstring).

    ``level`` and ``exc_info`` are keyword arguments of this function, so they cannot be field
    names; everything else passed by keyword becomes a field of the JSON line.
    """
    if logger.isEnabledFor(level):
        logger.log(level, event, exc_info=exc_info, extra={"fields": fields}, stacklevel=2)
