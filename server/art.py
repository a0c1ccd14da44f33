"""Checkpoints laid out as OpenPipe ART stores them, so ART users can fork into pluto.

ART keeps a model's checkpoints at ``<project>/models/<model>/checkpoints/<step>/``
(the step as a decimal directory name, often zero-padded) in its S3 bucket. Importing
one reads each object twice from that bucket through the server, once to hash it and
once to store it under its digest, so the bytes never pass through the client and
the stored copy is verified like any upload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pluto.digits import parse_digits
from pluto.wire import FileEntry
from pluto_server.blobs import BlobStore, ObjectEntry, blob_key
from pluto_server.errors import Conflict, NotFound


@dataclass(frozen=True)
class ArtCheckpoint:
    step: int
    prefix: str  # the step directory, ending in "/"
    objects: list[ObjectEntry]


def checkpoints_prefix(project: str, model: str) -> str:
    return f"{project}/models/{model}/checkpoints/"


async def find(source: BlobStore, project: str, model: str,
               not_after_step: int | None) -> ArtCheckpoint:
    """The newest ART checkpoint at or before ``not_after_step`` in ``source``."""
    base = checkpoints_prefix(project, model)
    # Step directory ("0020/") -> its objects, and step -> its directories.
    by_directory: dict[str, list[ObjectEntry]] = {}
    by_step: dict[int, set[str]] = {}
    for entry in await source.list(base):
        directory, slash, rest = entry.key[len(base):].partition("/")
        step = parse_digits(directory)
        # A key ending in "/" is a folder marker some tools write, not a file.
        if not slash or not rest or rest.endswith("/") or step is None:
            continue
        prefix = base + directory + "/"
        by_directory.setdefault(prefix, []).append(entry)
        by_step.setdefault(step, set()).add(prefix)
    where = f"{source.url}/{base}"
    if not by_step:
        raise NotFound(f"no ART checkpoint under {where}: check from_s3_bucket, from_project "
                       "(the ART project) and from_run (the ART model name)")
    steps = sorted(by_step)
    chosen = [s for s in steps if not_after_step is None or s <= not_after_step]
    if not chosen:
        raise NotFound(f"no ART checkpoint at or before step {not_after_step} under {where}; "
                       f"steps with one: {', '.join(map(str, steps))}")
    step = chosen[-1]
    if len(by_step[step]) > 1:  # "7/" and "0007/": which one is the checkpoint?
        folders = " and ".join(sorted(p.removeprefix(base) for p in by_step[step]))
        raise Conflict(f"the folders {folders} under {where} are both ART step {step}: "
                       "keep one of them")
    (prefix,) = by_step[step]
    return ArtCheckpoint(step=step, prefix=prefix, objects=by_directory[prefix])


async def import_files(source: BlobStore, checkpoint: ArtCheckpoint, target: BlobStore,
                       have_blob: Callable[[str], Awaitable[bool]],
                       stored: Callable[[str, int], Awaitable[None]]) -> list[FileEntry]:
    """Copy the checkpoint's objects into ``target`` as blobs; its manifest entries."""
    entries = []
    for obj in checkpoint.objects:
        digest = hashlib.sha256()
        _, chunks = await source.read(obj.key)
        async for chunk in chunks:
            digest.update(chunk)
        sha = digest.hexdigest()
        if not await have_blob(sha):
            size, again = await source.read(obj.key)
            await target.put(blob_key(sha), again, size=size, sha256=sha)
            await stored(sha, size)
        entries.append(FileEntry(path=obj.key[len(checkpoint.prefix):], size=obj.size,
                                 sha256=sha))
    return entries
