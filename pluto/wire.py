"""The wire formats: every body the SDK, the sidecar and the server exchange.

Defined once, here, so the three cannot drift. The control plane (runs, forks,
status) travels as JSON; the data plane (metric and log chunks) travels as
MessagePack because it is the hot path and MessagePack keeps NaN and +/-Inf as
real floats. Both are encoded and validated with msgspec.
"""

from __future__ import annotations

import enum
import math
import struct
from typing import Any, Final, Literal

import msgspec

API_PREFIX: Final = "/api/v1"
MSGPACK: Final = "application/msgpack"
JSON: Final = "application/json"
#: Content codings the server accepts on request bodies (``Content-Encoding``), best first.
#: It says so on every API response (``Accept-Encoding``, RFC 7694), so a client sends
#: zstd only to a server that takes it: an older one read an unknown coding as none.
REQUEST_ENCODINGS: Final = ("zstd", "gzip")

# Limits the server enforces; the SDK checks them too, so that one bad key or tag is dropped
# with a warning instead of getting the whole chunk or request refused.
MAX_KEY_LENGTH: Final = 256  # characters in a metric key
MAX_STEP: Final = 2**63 - 1  # steps are 64-bit
MAX_TAGS: Final = 256  # tags on a run
#: The largest writer label (a rank, or a node rank for system metrics): a 32-bit column.
MAX_WRITER: Final = 2**31 - 1
MAX_TAG_LENGTH: Final = 128
#: Keys the sidecar logs about its pod (CPU, memory, GPUs), with the Unix time as the step:
#: they are not the run's training steps (a run's step range leaves them out) and a fork
#: does not inherit them.
SYSTEM_PREFIX: Final = "sys/"
MAX_NAME_LENGTH: Final = 256  # characters in a run's name

#: The JSON encoding of non-finite floats in metric query answers (JSON has no NaN).
NON_FINITE_JSON: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class RunStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"

    @property
    def severity(self) -> int:
        """Concurrent finishes from many ranks converge on the most severe status."""
        return _SEVERITY[self]


_SEVERITY: Final = {
    RunStatus.RUNNING: 0,
    RunStatus.COMPLETED: 1,
    RunStatus.TERMINATED: 2,
    RunStatus.FAILED: 3,
}


class Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Request bodies reject unknown fields so a typo is an error, not a silent no-op."""


class Reply(msgspec.Struct, kw_only=True):
    """Response bodies ignore unknown fields so an older client reads a newer server."""


# ---------------------------------------------------------------------------
# Runs


class RunCreate(Body):
    """Create a run, or attach to the one with the same (project, run_id)."""

    project: str
    run_id: str | None = None
    name: str | None = None
    config: dict[str, Any] | None = None
    tags: list[str] | None = None
    resume: bool = False
    fork_run_id: str | None = None
    fork_step: int | None = None
    inherit_config: bool = True
    inherit_tags: bool = False


class RunUpdate(Body):
    """Config is deep-merged into the stored config; tags are added, then removed."""

    config: dict[str, Any] | None = None
    add_tags: list[str] | None = None
    remove_tags: list[str] | None = None


class RunFinish(Body):
    status: RunStatus = RunStatus.COMPLETED


class StatusChange(Reply):
    status: RunStatus
    at: float


class RunInfo(Reply):
    id: int
    project: str
    display_id: str
    run_id: str | None
    name: str
    config: dict[str, Any]
    tags: list[str]
    status: RunStatus
    created_at: float
    updated_at: float
    finished_at: float | None = None
    forked_from: int | None = None
    forked_from_display_id: str | None = None
    fork_step: int | None = None
    status_history: list[StatusChange] = []
    first_step: int | None = None
    last_step: int | None = None
    url: str = ""
    #: Asked for with ``?metrics=`` on a run list: each metric's value at the run's
    #: highest own step (the mean across writers); NaN and infinities as null in JSON.
    last_values: dict[str, float | None] = {}


class RunAttached(RunInfo, kw_only=True):
    """The answer to RunCreate: the run, and whether this caller created it."""

    resumed: bool = False


class RunList(Reply):
    """One page of a project's runs, newest first. ``next_cursor`` (None on the last page)
    asks for the next one: ``?cursor=<next_cursor>``."""

    runs: list[RunInfo]
    next_cursor: str | None = None


class ProjectInfo(Reply):
    name: str
    prefix: str
    runs: int
    created_at: float


class ProjectList(Reply):
    projects: list[ProjectInfo]


class AncestorLink(Reply):
    """One step up a lineage: ``run`` owns the steps up to and including ``until_step``."""

    id: int
    display_id: str
    name: str
    fork_step: int | None
    until_step: int | None


class LineageNode(Reply):
    """One run of a descendant tree, as an adjacency list (any depth, no recursion)."""

    id: int
    display_id: str
    name: str
    parent: int | None
    fork_step: int | None
    depth: int


class Lineage(Reply):
    """``ancestors`` runs from the run itself up to the root; ``descendants`` is the
    tree below the run in pre-order, starting with the run itself (depth 0, whose
    ``parent`` is its own fork parent, outside the tree)."""

    ancestors: list[AncestorLink]
    descendants: list[LineageNode]


# ---------------------------------------------------------------------------
# Data plane


#: A console line's ``stream``: the only two there are (the server refuses any other).
STDOUT: Final = 1
STDERR: Final = 2
LOG_STREAMS: Final = {STDOUT: "stdout", STDERR: "stderr"}


class LogLine(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    time: float
    stream: int  # STDOUT (1) or STDERR (2)
    line: str


class ChunkHeader(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A ``Chunk`` but its points: what the server reads of a chunk as Python objects.

    Its subclasses add the point columns: :class:`Chunk` as lists, and the server's
    ``PackedChunk`` (``pluto_server.columns``) as the MessagePack bytes it reads into arrays.
    """

    run: int
    session: str
    seq: int
    writer: int
    #: With ``run`` 0, the run is named by (project, external id) instead: a sidecar
    #: spools data before the server has told anyone the numeric id.
    project: str | None = None
    run_ref: str | None = None
    keys: list[str] = []
    logs: list[LogLine] = []
    finish: RunStatus | None = None


class Chunk(ChunkHeader, kw_only=True, forbid_unknown_fields=True):
    """Points and console lines from one writer, applied exactly once.

    ``(run, session, seq)`` is the idempotency key: ``session`` identifies one
    writer process for its lifetime and ``seq`` counts its chunks. Points are
    columnar: point ``i`` is ``(keys[key_index[i]], steps[i], values[i], times[i])``.
    A writer's last chunk carries ``finish``: the run's status is set with the
    last data, in the same transaction, however late that chunk is delivered.
    """

    key_index: list[int] = []
    steps: list[int] = []
    values: list[float] = []
    times: list[float] = []

    @property
    def point_count(self) -> int:
        return len(self.steps)


def msgpack_array_header(packed: bytes | memoryview | msgspec.Raw) -> tuple[int, int] | None:
    """``(header bytes, element count)`` of the MessagePack array that ``packed`` starts
    with, read without decoding its elements; None when it does not start with one."""
    head = memoryview(packed)[:5]  # the header only, not a copy of the elements
    if not head:
        return None
    first = head[0]
    if 0x90 <= first <= 0x9F:
        return 1, first & 0x0F
    if first == 0xDC and len(head) >= 3:
        return 3, int.from_bytes(head[1:3], "big")
    if first == 0xDD and len(head) >= 5:
        return 5, int.from_bytes(head[1:5], "big")
    return None


class ChunkEnvelope(msgspec.Struct, kw_only=True):
    """A ``Chunk`` read only as far as routing needs: who wrote it, for which run.

    The sidecar checks frames with this and forwards the bytes untouched; decoding
    every point into Python objects would cost it most of its time and memory. The
    server validates the points (a bad one is refused there, and dead-lettered).
    """

    run: int
    session: str
    seq: int
    writer: int
    project: str | None = None
    run_ref: str | None = None
    steps: msgspec.Raw = msgspec.Raw(b"\x90")

    @property
    def point_count(self) -> int:
        """From the MessagePack array header of ``steps``, without decoding it."""
        header = msgpack_array_header(self.steps)
        return 0 if header is None else header[1]


class IngestBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    chunks: list[Chunk]


JsonFloat = float | Literal["NaN", "Infinity", "-Infinity"] | None


class JsonChunk(Chunk, kw_only=True, forbid_unknown_fields=True):
    """A ``Chunk`` sent as JSON: values may be "NaN", "Infinity", "-Infinity" (or null
    for NaN), since JSON has no such numbers."""

    values: list[JsonFloat] = []  # type: ignore[assignment]

    def to_chunk(self) -> Chunk:
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        fields["values"] = [v if type(v) is float else parse_json_float(v) for v in self.values]
        return Chunk(**fields)


class JsonIngestBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    chunks: list[JsonChunk]

    def to_batch(self) -> IngestBatch:
        return IngestBatch(chunks=[chunk.to_chunk() for chunk in self.chunks])


class IngestResult(Reply):
    applied: int
    duplicates: int
    points: int


class MetricSeries(Reply):
    """Points of one key (and one writer unless aggregated), step-ordered.

    Raw queries fill ``values`` and ``times``; downsampled ones fill
    ``mins``/``maxs``/``means``/``counts``, with ``steps`` holding each
    bucket's first step and ``last_steps`` its last, and ``times`` the wall
    time of each bucket's first point. ``owners`` is the run that owns each
    point or bucket (a bucket never straddles a fork).
    """

    key: str
    writer: int | None
    steps: list[int]
    owners: list[int]
    values: list[float] = []
    times: list[float] = []
    last_steps: list[int] = []
    mins: list[float] = []
    maxs: list[float] = []
    means: list[float] = []
    counts: list[int] = []


class MetricQueryResult(Reply):
    run: int
    lineage: bool
    series: list[MetricSeries]


class MetricKeys(Reply):
    keys: list[str]


class LogRecord(Reply):
    id: int
    writer: int
    time: float
    stream: int
    line: str


class LogPage(Reply):
    lines: list[LogRecord]
    next_after: int | None


class ApiError(Reply):
    """Every 4xx/5xx answer: what went wrong and what to change."""

    detail: str


# ---------------------------------------------------------------------------
# Files and checkpoints
#
# Bytes travel as content-addressed blobs: the client hashes a file, asks which blobs
# the server lacks (``BlobCheck``), streams those (``PUT .../blobs/{sha256}``, raw body),
# then commits a manifest (``CheckpointCreate`` / ``FileCreate``) that names them. Only
# a committed manifest is listed, so an interrupted upload is never seen.

#: The response header of a blob download: the SHA-256 the client verifies.
SHA256_HEADER: Final = "x-content-sha256"


class FileEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One file of a checkpoint: its ``/``-separated path inside the checkpoint."""

    path: str
    size: int
    sha256: str


class BlobCheck(Body):
    sha256: list[str]


class BlobsMissing(Reply):
    """Which of the checked blobs the server does not hold yet (upload these)."""

    missing: list[str]


class BlobStored(Reply):
    sha256: str
    size: int


class CheckpointCreate(Body):
    step: int
    files: list[FileEntry]
    metadata: dict[str, Any] = {}


class CheckpointInfo(Reply):
    run: int  # the run the checkpoint belongs to
    run_display_id: str
    step: int
    size: int
    files: list[FileEntry]
    metadata: dict[str, Any]
    created_at: float
    #: Set when the checkpoint was forked in: where it came from.
    source_run: int | None = None
    source_display_id: str | None = None
    source_step: int | None = None
    source_uri: str | None = None  # an imported one: s3://bucket/prefix it came from
    source_project: str | None = None  # the source run's project (a fork may cross projects)


class CheckpointList(Reply):
    checkpoints: list[CheckpointInfo]


class CheckpointFork(Body):
    """Copy the newest checkpoint of ``from_run``'s lineage at or before
    ``not_after_step`` (newest overall when None) to the run of the URL."""

    from_run: str
    from_project: str | None = None
    not_after_step: int | None = None
    #: Read the checkpoint from this bucket, laid out as OpenPipe ART does:
    #: ``<from_project>/models/<from_run>/checkpoints/<step>/...``.
    from_s3_bucket: str | None = None


class FileCreate(Body):
    name: str
    size: int
    sha256: str
    step: int | None = None


class FileInfo(Reply):
    name: str
    size: int
    sha256: str
    step: int | None
    created_at: float


class FileList(Reply):
    files: list[FileInfo]


# ---------------------------------------------------------------------------
# Sidecar socket frames
#
# A frame is a 12-byte header, then a MessagePack payload:
#   magic b"PL" | protocol version u8 | kind u8 | request id u32 | payload length u32
# (little-endian). Replies carry the request id of the frame they answer; frames the
# sidecar sends on its own (a run resolved later) carry 0.

FRAME_MAGIC: Final = b"PL"
PROTOCOL_VERSION: Final = 1
FRAME_HEADER: Final = struct.Struct("<2sBBII")
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
DEFAULT_SOCKET: Final = "/var/run/pluto/pluto.sock"
#: The sidecar's HTTP proxy of the server API (files, checkpoints, queries), next to it.
DEFAULT_API_SOCKET: Final = "/var/run/pluto/api.sock"


class FrameKind(enum.IntEnum):
    HELLO = 1  # client -> sidecar: Hello, first frame of every connection
    WELCOME = 2  # sidecar -> client: Welcome
    OPEN_RUN = 3  # client -> sidecar: RunCreate
    RUN = 4  # sidecar -> client: RunOpened (a reply, or pushed once a pending run resolves)
    CHUNK = 5  # client -> sidecar: Chunk
    ACK = 6  # sidecar -> client: Ack, once the chunk is in the sidecar's durable spool
    UPDATE_RUN = 7  # client -> sidecar: RunUpdateRequest
    UPDATED = 8  # sidecar -> client: Ack (queued durably)
    ERROR = 9  # sidecar -> client: FrameError
    #: client -> sidecar: NodeInfo, not answered; sent only to a sidecar whose Welcome lists
    #: FEATURE_NODE (an older sidecar would refuse a frame kind it does not know).
    NODE = 10


class Hello(Body):
    protocol: int
    session: str
    writer: int
    pid: int


#: A sidecar that takes NODE frames says so in ``Welcome.features``.
FEATURE_NODE: Final = "node"


class Welcome(Reply):
    protocol: int
    max_frame_bytes: int
    sidecar: str
    #: What this sidecar takes beyond protocol 1's frames (``FEATURE_NODE``); absent from
    #: older sidecars, so a client asks before it sends such a frame.
    features: list[str] = []


class NodeInfo(Body):
    """What a client knows of its node (pod) that the sidecar cannot see for itself.

    ``node_rank``: the node as its launcher numbers it (torchrun's ``GROUP_RANK``, the rank of
    the pod among the job's nodes); the sidecar labels its system metrics with it.
    ``gpus``: UUIDs of the GPUs the client's container uses, in the container's index order
    (``pluto.gpus``); the sidecar, which is given all of the node's GPUs, reports these
    only, as ``sys/gpu/<position in this list>/``. ``[]``: the container has no GPUs.
    None: not known."""

    node_rank: int | None = None
    gpus: list[str] | None = None


class RunOpened(Reply):
    """``run`` is None while the server has not answered yet (``pending`` says why)."""

    project: str
    run_ref: str
    run: RunAttached | None = None
    pending: str | None = None


class RunUpdateRequest(Body):
    project: str
    run_ref: str
    update: RunUpdate


class Ack(Reply):
    seq: int


class FrameError(Reply):
    """``fatal``: the sidecar closes the connection after sending it."""

    detail: str
    fatal: bool = False


#: The bodies that travel only over the sidecar socket (never over HTTP).
SOCKET_ONLY: Final = (Hello, Welcome, NodeInfo, RunOpened, RunUpdateRequest, Ack, FrameError,
                      ChunkEnvelope)


class FrameFormatError(ValueError):
    """A frame header that cannot be right: what the peer must change."""


def frame_header(kind: FrameKind, request_id: int, length: int) -> bytes:
    """The header of a frame whose payload is ``length`` bytes (sent before the payload,
    without copying a big payload behind it)."""
    return FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, kind, request_id, length)


def encode_frame(kind: FrameKind, request_id: int, payload: bytes) -> bytes:
    return frame_header(kind, request_id, len(payload)) + payload


def parse_frame_header(header: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[
        FrameKind, int, int]:
    """(kind, request id, payload length) of a frame header, or ``FrameFormatError``."""
    magic, version, kind, request_id, length = FRAME_HEADER.unpack(header)
    if magic != FRAME_MAGIC:
        raise FrameFormatError("not a pluto frame (bad magic): is this client speaking the "
                               "pluto sidecar protocol?")
    if version != PROTOCOL_VERSION:
        raise FrameFormatError(
            f"protocol version {version} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}); use matching pluto SDK and sidecar versions"
        )
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise FrameFormatError(f"unknown frame kind {kind}") from None
    if length > max_bytes:
        raise FrameFormatError(
            f"frame of {length} bytes is larger than the limit of {max_bytes}; "
            "send smaller chunks (Settings.max_chunk_points)"
        )
    return frame_kind, request_id, length


# ---------------------------------------------------------------------------
# Codecs, shared so every side encodes the same way

_msgpack_encoder: Final = msgspec.msgpack.Encoder()
_json_encoder: Final = msgspec.json.Encoder()


def encode_msgpack(obj: Any) -> bytes:
    return _msgpack_encoder.encode(obj)


def encode_json(obj: Any) -> bytes:
    return _json_encoder.encode(obj)


def json_float(value: float) -> float | str:
    """JSON has no NaN or Infinity: send them as the strings in ``NON_FINITE_JSON``."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def parse_json_float(value: float | str | None) -> float:
    if isinstance(value, str):
        return NON_FINITE_JSON[value]
    if value is None:
        return math.nan
    return float(value)
