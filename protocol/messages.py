"""The message types: one dataclass per message, typed fields, validated on construction.

Field annotations are the schema. `Message.__post_init__` checks every field against its annotation
(strictly: a bool is not an int, a float must be finite, enums must be known values, `JobId` and
`Count` carry their restriction in the annotation) and a class with further rules adds `_check`.
Because `decode` builds messages through the same constructor, a message that decodes is exactly as
valid as one built locally.
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin, get_type_hints

import numpy as np

from .arrays import dtype_name
from .errors import ErrorCode, MalformedMessage, ProtocolError, RemoteError
from .limits import DEFAULT_LIMITS, Limits, Role
from .settings import GENERATE, REPROCESS, TEXTURE

# Job ids and array names end up in file names and logs: keep them boring.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
MAX_NESTING = 8  # depth of nested lists/maps allowed in settings, metadata and details
_INT64 = (-(1 << 63), (1 << 63) - 1)

JobId = Annotated[str, "name"]  # a str matching NAME_PATTERN
Count = Annotated[int, "count"]  # an int >= 0


class ModelStatus(str, Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WorkerState(str, Enum):
    LOADING = "loading"  # starting, or loading its models
    IDLE = "idle"
    BUSY = "busy"
    FAILED = "failed"  # its models failed to load: it takes no jobs (the reason is in `error`)
    RESTARTING = "restarting"  # it died or stopped answering; a new one is on its way


@dataclass(frozen=True)
class Message:
    """Base of all messages. TYPE is the wire name; SENT_BY says which side may send it."""

    TYPE: ClassVar[str]
    SENT_BY: ClassVar[Role]
    TERMINAL: ClassVar[bool] = False  # ends the life of the job it names

    def __post_init__(self) -> None:
        _check_fields(self, self.TYPE)
        self._check()

    def _check(self) -> None:
        """Semantic checks beyond the field types; overridden where a message has any."""


@dataclass(frozen=True)
class WorkerStatus:
    """One worker behind a server, as `info.workers` lists it (a map on the wire)."""

    name: str  # e.g. "gpu1", "cpu0", "ray2"
    host: str
    device: str  # e.g. "cuda:0 NVIDIA H200"; before loading, what it was given
    state: WorkerState
    jobs: list[JobId] = field(default_factory=list)  # running there (two while one's asset step overlaps)
    models: list[str] = field(default_factory=list)  # the networks it holds
    restarts: Count = 0
    pid: Count | None = None
    error: str = ""  # why it failed or was last restarted
    loading: str = ""  # while it loads: what, e.g. "downloading ckpts/x.safetensors: 1.2 of 2.6 GB (46%)"
    loading_fraction: float = 0.0  # of the item being downloaded or of the models being read, in [0, 1]

    def __post_init__(self) -> None:
        _check_fields(self, "worker")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).value if f.name == "state" else getattr(self, f.name)
                for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> WorkerStatus:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise MalformedMessage(f"a worker must be a map with exactly the keys {sorted(names)}, got {data!r:.200}")
        return cls(**data)


@dataclass(frozen=True)
class Hello(Message):
    """Client introduces itself; the server answers with Info."""

    TYPE = "hello"
    SENT_BY = "client"
    client: str
    client_version: str
    # What the client accepts. The server encodes its replies to this client with these limits, so a
    # result too big for the client becomes an Error(limit_exceeded) instead of a frame its socket drops.
    limits: Limits = DEFAULT_LIMITS

    def _check(self) -> None:
        low = self.limits.below_peer_minimum()
        if low:
            raise MalformedMessage(f"hello.limits are below what every client must accept: {', '.join(low)}",
                                   hint="raise those limits to at least the minimum (protocol/limits.py PEER_MINIMUM)")


@dataclass(frozen=True)
class Info(Message):
    """Server's self-description and current load, the answer to Hello."""

    TYPE = "info"
    SENT_BY = "server"
    server: str
    server_version: str
    model: str
    model_status: ModelStatus
    device: str
    queue_length: Count
    instance: str  # random id of this server process: a new one after every restart
    gpu_memory_free: Count | None = None  # bytes; None on CPU or when unknown
    gpu_memory_total: Count | None = None
    capabilities: list[str] = field(default_factory=list)
    limits: Limits = DEFAULT_LIMITS  # what the server accepts; the client adopts it for what it sends
    details: dict[str, Any] = field(default_factory=dict)  # free-form facts: library versions, ...
    settings: dict[str, Any] = field(default_factory=dict)  # the server's settings schema (Schema.to_wire)
    workers: list[WorkerStatus] = field(default_factory=list)  # who runs the jobs, one entry per worker

    def loading_summary(self) -> str:
        """What a loading worker is doing, for status lines ("" when none is loading)."""
        return next((w.loading for w in self.workers if w.loading), "")

    def workers_summary(self) -> str:
        """How many workers serve, for status lines: "2 workers (1 busy, 1 restarting)"; "" when none are listed."""
        if not self.workers:
            return ""
        counts: dict[str, int] = {}
        for worker in self.workers:
            if worker.state != WorkerState.IDLE:
                counts[worker.state.value] = counts.get(worker.state.value, 0) + 1
        states = f" ({', '.join(f'{n} {state}' for state, n in counts.items())})" if counts else ""
        return f"{len(self.workers)} worker{'s' if len(self.workers) > 1 else ''}{states}"


class Request(Message):
    """Base of the messages that start a job; the server answers each with Accepted or a refusing Error.
    `settings` is a flat map of the settings schema's names (protocol/settings.py) for this request's KIND."""

    KIND: ClassVar[str]
    SENT_BY = "client"


@dataclass(frozen=True)
class Generate(Request):
    """Image to 3D: the encoded image file (PNG/JPEG/WebP/BMP/TIFF) and generation + asset settings."""

    TYPE = "generate"
    KIND = GENERATE
    image: bytes
    settings: dict[str, Any] = field(default_factory=dict)
    client_job_id: JobId | None = None  # echoed in Accepted/Error so the client can match the answer


@dataclass(frozen=True)
class Reprocess(Request):
    """Rebuild the asset of an earlier job from its stored O-Voxel with other asset settings (no generation)."""

    TYPE = "reprocess"
    KIND = REPROCESS
    source_job_id: JobId
    settings: dict[str, Any] = field(default_factory=dict)
    client_job_id: JobId | None = None


@dataclass(frozen=True, eq=False)  # ndarray fields make dataclass equality ambiguous
class Texture(Request):
    """Texture an existing mesh from an image: `mesh` holds `positions` float32 [N, 3], `indices` uint32 [F, 3]
    and optionally `uvs` float32 [3F, 2] (one per face corner, v up)."""

    TYPE = "texture"
    KIND = TEXTURE
    image: bytes
    mesh: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    client_job_id: JobId | None = None


@dataclass(frozen=True)
class Accepted(Message):
    TYPE = "accepted"
    SENT_BY = "server"
    job_id: JobId
    queue_position: Count  # 0: running now; n: n jobs ahead
    client_job_id: JobId | None = None


@dataclass(frozen=True)
class Progress(Message):
    TYPE = "progress"
    SENT_BY = "server"
    job_id: JobId
    stage: str  # e.g. "queued", "preprocess", "sparse_structure", "shape", "texture", "bake"
    step: Count  # step within the stage
    total: Count  # steps in the stage; 0 when unknown
    fraction: float  # overall progress of the job in [0, 1]
    message: str = ""

    def _check(self) -> None:
        if not self.stage:
            raise MalformedMessage("progress.stage must not be empty")
        if self.total and self.step > self.total:
            raise MalformedMessage(f"progress.step {self.step} exceeds progress.total {self.total}")
        if not 0.0 <= self.fraction <= 1.0:
            raise MalformedMessage(f"progress.fraction must be within [0, 1], got {self.fraction}")


@dataclass(frozen=True, eq=False)  # ndarray fields make dataclass equality ambiguous
class Result(Message):
    """The finished asset: mesh buffers and PBR textures as named arrays, plus metadata."""

    TYPE = "result"
    SENT_BY = "server"
    TERMINAL = True
    job_id: JobId
    mesh: dict[str, np.ndarray] = field(default_factory=dict)
    textures: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error(Message):
    """A failure. With a job id it ends that job; with only client_job_id it rejects a submit;
    with neither it complains about the connection (e.g. a malformed message)."""

    TYPE = "error"
    SENT_BY = "server"
    TERMINAL = True
    code: ErrorCode
    message: str
    hint: str = ""
    job_id: JobId | None = None
    client_job_id: JobId | None = None

    @classmethod
    def from_exception(cls, exc: ProtocolError, job_id: str | None = None,
                       client_job_id: str | None = None) -> Error:
        """The reply a server sends for a ProtocolError (e.g. one raised by decode)."""
        return cls(exc.code, exc.message, exc.hint, job_id, client_job_id)

    def to_exception(self) -> RemoteError:
        return RemoteError(self.code, self.message, self.hint, self.job_id)


@dataclass(frozen=True)
class Cancel(Message):
    TYPE = "cancel"
    SENT_BY = "client"
    job_id: JobId


@dataclass(frozen=True)
class Cancelled(Message):
    TYPE = "cancelled"
    SENT_BY = "server"
    TERMINAL = True
    job_id: JobId


@dataclass(frozen=True)
class Fetch(Message):
    """Subscribe to a job's events (after a reconnect or a server restart, or from a second client): the answer is
    its latest progress, or its terminal message again once it has ended. Every subscriber gets the events."""

    TYPE = "fetch"
    SENT_BY = "client"
    job_id: JobId


@dataclass(frozen=True)
class Ping(Message):
    TYPE = "ping"
    SENT_BY = "client"
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE = "pong"
    SENT_BY = "server"
    seq: int  # the seq of the Ping it answers
    instance: str  # the server's Info.instance: a change means the server restarted
    greeted: bool  # the server holds this connection's hello; False: greet again and fetch the open jobs


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Info, Generate, Reprocess, Texture, Accepted, Progress, Result, Error, Cancel,
                              Cancelled, Fetch, Ping, Pong)
}


def binary_fields(cls: type[Message]) -> dict[str, str]:
    """Fields carried in frames of their own: {field: "bytes" | "arrays"}; the rest go in the header."""
    kinds = {}
    for name, hint in _hints(cls).items():
        if hint is bytes:
            kinds[name] = "bytes"
        elif get_origin(hint) is dict and get_args(hint)[1] is np.ndarray:
            kinds[name] = "arrays"
    return kinds


_HINTS: dict[type, dict[str, Any]] = {}


def _check_fields(obj: Any, prefix: str) -> None:
    """Check and normalise every field of a message or record against its annotation."""
    for f in fields(obj):
        hint = _hints(type(obj))[f.name]
        object.__setattr__(obj, f.name, _coerce(f"{prefix}.{f.name}", getattr(obj, f.name), hint))


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = get_type_hints(cls, include_extras=True)
        _HINTS[cls] = {f.name: hints[f.name] for f in fields(cls)}
    return _HINTS[cls]


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check `value` against annotation `hint` and return it normalised (tuples to lists, str to enum)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:  # JobId, Count: the base type, then the restriction
        value = _coerce(path, value, args[0])
        (_name if args[1] == "name" else _non_negative)(path, value)
        return value
    if origin in (Union, types.UnionType):  # only `X | None` is used
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(path, value, inner)
    if hint in (str, int, float, bool):
        return _scalar(path, value, hint)
    if hint is bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise MalformedMessage(f"{path} must be bytes, got {type(value).__name__}")
        return bytes(value)
    if hint in (Limits, WorkerStatus):  # records: maps with exactly their fields on the wire
        return value if isinstance(value, hint) else hint.from_dict(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise MalformedMessage(f"{path} must be one of {[m.value for m in hint]}, got {value!r:.100}") from None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MalformedMessage(f"{path} must be a list, got {type(value).__name__}")
        return [_coerce(f"{path}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MalformedMessage(f"{path} must be a map, got {type(value).__name__}")
        if args[1] is Any:
            return _tree(path, value, 1)
        if args[1] is np.ndarray:
            for key, item in value.items():
                _name(f"{path} key", key)
                _array(f"{path}[{key!r}]", item)
            return dict(value)
    raise TypeError(f"{path}: unsupported annotation {hint!r}")  # a bug in this module, not bad input


def _scalar(path: str, value: Any, kind: type) -> Any:
    if kind is float and type(value) is int:
        value = float(value)  # peers written in other languages may send 1 for 1.0
    if type(value) is not kind:
        raise MalformedMessage(f"{path} must be {kind.__name__}, got {type(value).__name__}")
    if kind is int and not _INT64[0] <= value <= _INT64[1]:
        raise MalformedMessage(f"{path} = {value} does not fit in 64 bits")
    if kind is float and not math.isfinite(value):
        raise MalformedMessage(f"{path} must be finite, got {value}")
    return value


def _tree(path: str, value: Any, depth: int) -> Any:
    """Validate a msgpack-safe value tree (settings, metadata): scalars, lists, maps with str keys."""
    if depth > MAX_NESTING:
        raise MalformedMessage(f"{path} is nested deeper than {MAX_NESTING} levels")
    if value is None or type(value) in (bool, str):
        return value
    if type(value) in (int, float):
        return _scalar(path, value, type(value))
    if isinstance(value, (list, tuple)):
        return [_tree(f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str:
                raise MalformedMessage(f"{path} keys must be str, got {type(key).__name__}")
        return {key: _tree(f"{path}.{key:.40}", item, depth + 1) for key, item in value.items()}
    raise MalformedMessage(f"{path} must be None, bool, int, float, str, list or map, got {type(value).__name__}")


def _array(path: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise MalformedMessage(f"{path} must be a numpy array, got {type(value).__name__}")
    dtype_name(value)
    return value


def _name(path: str, value: Any) -> None:
    if type(value) is not str or not NAME_PATTERN.fullmatch(value):
        raise MalformedMessage(f"{path} must be 1-128 characters of A-Z a-z 0-9 _ . - starting with a letter "
                               f"or digit, got {value!r:.100}")


def _non_negative(path: str, value: int) -> None:
    if value < 0:
        raise MalformedMessage(f"{path} must be >= 0, got {value}")
