"""API keys: created once, shown once, stored as a SHA-256 hash.

A key looks like ``pluto_<lookup>_<secret>``. The lookup part finds the row; the
whole key is hashed and compared in constant time. Keys are high-entropy random
strings, so a fast hash is the right tool (as for GitHub tokens); a password
hash would only slow every request down.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto_server.errors import Unauthorized
from pluto_server.schema import api_keys

KEY_PREFIX = "pluto_"
CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class KeyIdentity:
    id: int
    name: str
    project: str | None  # None: every project


@dataclass(frozen=True)
class NewKey:
    identity: KeyIdentity
    plaintext: str


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_key(conn: Connection, name: str, project: str | None = None) -> NewKey:
    lookup = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}{lookup}_{secrets.token_urlsafe(32)}"
    key_id = conn.execute(
        sa.insert(api_keys)
        .values(name=name, lookup=lookup, secret_hash=hash_key(plaintext), project=project,
                created_at=time.time())
        .returning(api_keys.c.id)
    ).scalar_one()
    return NewKey(KeyIdentity(int(key_id), name, project), plaintext)


def list_keys(conn: Connection) -> list[dict[str, object]]:
    rows = conn.execute(
        sa.select(api_keys.c.lookup, api_keys.c.name, api_keys.c.project,
                  api_keys.c.created_at, api_keys.c.revoked_at).order_by(api_keys.c.id)
    ).mappings()
    return [dict(row) for row in rows]


def revoke_key(conn: Connection, lookup: str) -> bool:
    result = conn.execute(
        sa.update(api_keys)
        .where(api_keys.c.lookup == lookup, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=time.time())
    )
    return result.rowcount == 1


def count_keys(conn: Connection) -> int:
    return int(conn.execute(
        sa.select(sa.func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
    ).scalar_one())


class KeyVerifier:
    """Checks presented keys, remembering good ones briefly so ingest stays cheap.

    A revoked key stops working within ``CACHE_SECONDS``.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, KeyIdentity]] = {}
        self._lock = threading.Lock()

    def check(self, conn: Connection, presented: str | None) -> KeyIdentity:
        if not presented:
            raise Unauthorized(
                "this server requires an API key: send 'Authorization: Bearer <key>' "
                "(the SDK reads PLUTO_API_KEY); create one with 'pluto keys create'"
            )
        digest = hash_key(presented)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        parts = presented.split("_")
        row = None
        if presented.startswith(KEY_PREFIX) and len(parts) >= 3:
            row = conn.execute(
                sa.select(api_keys).where(api_keys.c.lookup == parts[1],
                                          api_keys.c.revoked_at.is_(None))
            ).mappings().first()
        # Compare even when no row matched, so timing does not reveal which part was wrong.
        stored = row["secret_hash"] if row is not None else "0" * 64
        if not hmac.compare_digest(stored, digest) or row is None:
            raise Unauthorized("the API key was not accepted: it is unknown or revoked")
        identity = KeyIdentity(int(row["id"]), str(row["name"]), row["project"])
        with self._lock:
            self._cache[digest] = (now + CACHE_SECONDS, identity)
        return identity
