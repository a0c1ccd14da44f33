"""Project names, display ids and run references."""

from __future__ import annotations

import re

from pluto_server.errors import Unprocessable

# The same text as the CRD's patterns (tests/test_crd.py), which Kubernetes reads as ECMA-262:
# matched with fullmatch, since Python's "$" also matches before a trailing newline.
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# No "/": an external id must work as one URL path segment (GET /runs/{ref}).
EXTERNAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
DISPLAY_ID = re.compile(r"^([A-Z0-9]{1,8})-([0-9]+)\Z")
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def check_project_name(name: str) -> str:
    if not PROJECT_NAME.fullmatch(name):
        raise Unprocessable(
            f"project name {name!r} is not valid: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_storable_text(value: str, what: str) -> str:
    """PostgreSQL stores no NUL character in a text column (the insert, or a lookup by it,
    fails): refused here with a 422 that names the field, on every backend alike."""
    if "\x00" in value:
        raise Unprocessable(f"{what} {value[:40]!r} holds a NUL character (\\x00): remove it")
    return value


def check_external_id(run_id: str) -> str:
    if not EXTERNAL_ID.fullmatch(run_id):
        raise Unprocessable(
            f"run_id {run_id!r} is not valid: use 1-128 letters, digits or . _ : @ + -, "
            "starting with a letter or digit"
        )
    return run_id


def project_prefix(name: str) -> str:
    """``my-model-project`` -> ``MMP``; ``mnist`` -> ``MNI``; ``BigNet`` -> ``BN``.

    The initials of up to three words, or the first three characters of a
    single word, so display ids read like issue keys.
    """
    words = _WORD.findall(name)
    if len(words) >= 2:
        prefix = "".join(word[0] for word in words[:3])
    elif words:
        prefix = words[0][:3]
    else:
        prefix = "RUN"
    return prefix.upper()


def display_id(prefix: str, number: int | None) -> str:
    return f"{prefix}-{number if number is not None else 0}"


#: A run's number is a 32-bit INTEGER column on every backend.
MAX_RUN_NUMBER = 2**31 - 1


def parse_display_id(ref: str) -> tuple[str, int] | None:
    """(prefix, number) of a display id such as ``MNIST-12``; None for anything else,
    including a number no run can have (it reached the database and overflowed there).

    Only ASCII is upper-cased: ``"\ufb03-1".upper()`` is ``"FFI-1"``, a different run's id."""
    match = DISPLAY_ID.match(ref.upper()) if ref.isascii() else None
    if match is None or int(match.group(2)) > MAX_RUN_NUMBER:
        return None
    return match.group(1), int(match.group(2))
