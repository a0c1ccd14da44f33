"""Moving file bytes to and from the server: hashed, streamed, verified, resumable.

An upload hashes each file, asks the server which blobs it lacks, streams only those
(one file never sits in memory: it is read in ``CHUNK_BYTES`` pieces), and then the
caller commits a manifest. A download writes to ``NAME.partial`` while hashing, checks
the digest the server announced, and renames; a file already present with the right
digest is not fetched again. Big transfers show a progress bar on a terminal and stay
quiet otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import msgspec

from pluto.errors import PlutoError, RequestRejected, ServerUnavailable
from pluto.transport.http import ApiClient, error_detail
from pluto.wire import SHA256_HEADER, BlobCheck, BlobsMissing, BlobStored, FileEntry

if TYPE_CHECKING:
    from rich.progress import Progress

T = TypeVar("T")

CHUNK_BYTES = 1024 * 1024
#: Transfers at least this big get a progress bar (on a terminal).
PROGRESS_MIN_BYTES = 16 * 1024 * 1024
#: Tries of one blob transfer when the server is unreachable or busy.
ATTEMPTS = 5


class ChecksumMismatch(PlutoError):
    """Downloaded bytes do not hash to the digest the server recorded."""


@dataclass(frozen=True)
class LocalFile:
    path: str  # inside the checkpoint, "/"-separated
    source: Path
    size: int
    sha256: str

    def entry(self) -> FileEntry:
        return FileEntry(path=self.path, size=self.size, sha256=self.sha256)


def collect(root: Path) -> list[tuple[str, Path]]:
    """A file as itself, or every file under a directory by its relative path."""
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is neither a file nor a directory")
    found = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    if not found:
        raise FileNotFoundError(f"{root} holds no file")
    return found


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def _progress(total: int, quiet: bool) -> Progress:
    # rich is imported here, not with this module: ``import pluto`` (every rank, every
    # sidecar) should not pay for the progress bars of checkpoint transfers.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
        disable=quiet or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty(),
        # stderr: stdout may be the training script's data; rich would pick stdout.
        console=Console(stderr=True), transient=False,
    )


class Transfer:
    """Blob uploads and downloads for one run, through one ``ApiClient``."""

    def __init__(self, client: ApiClient, run_ref: str, project: str | None, *,
                 quiet: bool = False) -> None:
        self.client = client
        self.run_ref = run_ref
        self.params = {"project": project} if project else {}
        self.quiet = quiet

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        delay = 0.5
        for tries in range(1, ATTEMPTS + 1):
            try:
                return attempt()
            except (ServerUnavailable, httpx.TransportError) as exc:
                failure: Exception = exc
            except RequestRejected as exc:
                if exc.permanent:
                    raise
                failure = exc
            if tries == ATTEMPTS:
                raise ServerUnavailable(f"{what} failed {ATTEMPTS} times: {failure}") from failure
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    # -- upload -----------------------------------------------------------------

    def upload(self, files: list[tuple[str, Path]], label: str) -> list[FileEntry]:
        """Hash and upload what the server lacks; the manifest entries to commit."""
        total = sum(source.stat().st_size for _, source in files)
        with _progress(total, self.quiet) as progress:
            hashing = progress.add_task(f"hashing {label}", total=total)
            local = [
                LocalFile(path, source, source.stat().st_size,
                          sha256_of(source, lambda n: progress.advance(hashing, n)))
                for path, source in files
            ]
            missing = set(self.client.call(
                "POST", f"/runs/{self.run_ref}/blobs/missing", BlobsMissing,
                body=BlobCheck(sha256=sorted({f.sha256 for f in local})), params=self.params,
            ).missing)
            sending = [f for f in local if f.sha256 in missing]
            unique = {f.sha256: f for f in sending}
            task = progress.add_task(f"uploading {label}",
                                     total=sum(f.size for f in unique.values()))
            for item in unique.values():
                self._retrying(f"uploading {item.path}",
                               lambda item=item: self._put(item, progress, task))  # type: ignore[misc]
        return [f.entry() for f in local]

    def _put(self, item: LocalFile, progress: Progress, task: object) -> None:
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            with item.source.open("rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    sent += len(chunk)
                    progress.advance(task, len(chunk))  # type: ignore[arg-type]
                    yield chunk

        try:
            response = self.client.http.put(
                f"/runs/{self.run_ref}/blobs/{item.sha256}", params=self.params, content=body(),
                headers={"content-length": str(item.size),
                         "content-type": "application/octet-stream"},
                timeout=httpx.Timeout(self.client.http.timeout.read or 30.0, write=300.0),
            )
        except httpx.TransportError as exc:
            progress.advance(task, -sent)  # type: ignore[arg-type]
            raise ServerUnavailable(f"cannot reach {self.client.where()}: {exc}") from exc
        if response.status_code >= 400:
            progress.advance(task, -sent)  # type: ignore[arg-type]
            raise RequestRejected(response.status_code, error_detail(response))
        stored = msgspec.json.decode(response.content, type=BlobStored)
        if stored.sha256 != item.sha256:
            raise ChecksumMismatch(f"the server stored {item.path} as {stored.sha256}, "
                                   f"not {item.sha256}")

    # -- download ---------------------------------------------------------------

    def download(self, files: list[tuple[str, FileEntry]], dest: Path, label: str) -> Path:
        """``files``: (URL path under the run, entry). Each lands at ``dest/entry.path``.

        Every rank of a node loading one checkpoint downloads into the same ``dest``: one
        at a time (a lock beside ``dest``), so the first downloads and the others find the
        files there, checked against their digests.
        """
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise PlutoError(f"cannot download {label} into {dest}: it exists and is not a "
                             "directory; choose another destination") from None
        except OSError as exc:
            raise PlutoError(f"cannot download {label} into {dest}: "
                             f"{exc.strerror or exc}; choose another destination") from None
        with _locked(dest.parent / f".{dest.name}.lock"):
            return self._download(files, dest, label)

    def _download(self, files: list[tuple[str, FileEntry]], dest: Path, label: str) -> Path:
        root = dest.resolve()
        for _, entry in files:  # before anything is read or written: no path leaves dest
            if not (dest / entry.path).resolve().is_relative_to(root):
                raise PlutoError(f"refusing to write {entry.path!r} outside {dest}")
        todo = [(url, e) for url, e in files if not _present(dest / e.path, e)]
        with _progress(sum(e.size for _, e in todo), self.quiet) as progress:
            task = progress.add_task(f"downloading {label}", total=sum(e.size for _, e in todo))
            for url, entry in todo:
                target = dest / entry.path
                self._retrying(f"downloading {entry.path}",
                               lambda url=url, entry=entry, target=target:  # type: ignore[misc]
                               self._get(url, entry, target, progress, task))
        return dest

    def _get(self, url: str, entry: FileEntry, target: Path, progress: Progress,
             task: object) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of this attempt's own: where the lock does not hold (a filesystem without
        # flock), two processes never write one file, and no file of the checkpoint is hit.
        partial = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        try:
            self._get_to(url, entry, target, partial, progress, task)
        finally:
            partial.unlink(missing_ok=True)

    def _get_to(self, url: str, entry: FileEntry, target: Path, partial: Path,
                progress: Progress, task: object) -> None:
        digest = hashlib.sha256()
        received = 0
        try:
            with self.client.http.stream("GET", f"/runs/{self.run_ref}/{url}",
                                         params=self.params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise RequestRejected(response.status_code, error_detail(response))
                announced = response.headers.get(SHA256_HEADER, entry.sha256)
                with partial.open("wb") as handle:
                    for chunk in response.iter_raw():
                        digest.update(chunk)
                        handle.write(chunk)
                        received += len(chunk)
                        progress.advance(task, len(chunk))  # type: ignore[arg-type]
                    handle.flush()
                    os.fsync(handle.fileno())
        except httpx.TransportError as exc:
            progress.advance(task, -received)  # type: ignore[arg-type]
            partial.unlink(missing_ok=True)
            raise ServerUnavailable(f"cannot reach {self.client.where()}: {exc}") from exc
        actual = digest.hexdigest()
        if actual != entry.sha256 or announced != entry.sha256:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{entry.path} arrived with sha256 {actual}, but the checkpoint records "
                f"{entry.sha256}: the stored copy is damaged or was changed outside pluto"
            )
        os.replace(partial, target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if need be) while the block runs."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _present(path: Path, entry: FileEntry) -> bool:
    try:
        if path.stat().st_size != entry.size:
            return False
    except FileNotFoundError:
        return False
    return sha256_of(path) == entry.sha256
