"""The on-disk job store: every job's input, state and outcome, so results outlive clients and restarts.

One folder per job under `ROOT/jobs/JOB_ID/`:

    record.json   state (queued | result | error | cancelled), settings, timestamps, error, result metadata
    input.image   the submitted image file (deleted once the job has ended)
    mesh.npz      a texture job's mesh (kept, like the O-Voxel, so its textures can be baked again)
    ovoxel.npz    the generated O-Voxel, kept so the asset can be rebuilt with other settings
    result.npz    the result arrays, keys "mesh.NAME" and "textures.NAME"

Every file is written to a temporary name, flushed to disk and renamed over the final name, and `record.json` is
written last: a job whose record says `result` always has its complete `result.npz`, and a crash mid-write leaves
the job queued (it runs again after the restart) instead of serving half a file. A lock file keeps a second server
from sharing the folder. Folders are 0700 and files 0600: only the server's user reads inputs and results.
Finished jobs are purged by age and, over the size cap, oldest first, collected before uncollected; queued jobs are
never purged, but count toward the cap, so a full store refuses new jobs (`has_room`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from backend.ovoxel.ovoxel import OVoxel
from protocol import Cancelled, Error, ErrorCode, Result
from protocol.messages import NAME_PATTERN

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one server per store is then the operator's duty
    fcntl = None

log = logging.getLogger(__name__)

QUEUED = "queued"
TERMINAL_STATES = ("result", "error", "cancelled")
Terminal = Result | Error | Cancelled
RECORD, INPUT, MESH, OVOXEL, RESULT = "record.json", "input.image", "mesh.npz", "ovoxel.npz", "result.npz"
TMP_SUFFIX = ".tmp"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


class StoreError(RuntimeError):
    """The store folder cannot be used (locked by another server, not writable, ...)."""


class MissingOVoxel(LookupError):
    """A re-processing job's source has no stored O-Voxel (any more)."""


@dataclass
class JobRecord:
    job_id: str
    created: float
    kind: str  # the request: generate, reprocess or texture (protocol.settings.REQUESTS)
    settings: dict[str, Any]  # as the client sent them, checked against the settings schema
    source_job_id: str | None = None  # reprocess: the job whose O-Voxel is rebuilt
    client_job_id: str | None = None
    owner: str = ""  # the submitting client's CURVE public key (Z85); "" without authentication
    state: str = QUEUED
    finished: float | None = None
    error: dict[str, str] | None = None  # code, message, hint
    metadata: dict[str, Any] = field(default_factory=dict)  # the result's metadata
    delivered: bool = False  # the terminal message was sent to a client at least once
    size: int = 0  # bytes on disk, all files of the job

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write `path` so that readers see either the old file or the complete new one, also after a power cut."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class JobStore:
    """Thread-safe: the server's I/O thread and the worker both use it."""

    def __init__(self, root: Path, max_bytes: int, max_age_s: float) -> None:
        self.root = Path(root)
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._lock = threading.RLock()
        self._jobs_dir = self.root / "jobs"
        try:
            self._jobs_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
            for folder in (self.root, self._jobs_dir):  # also a store made before folders were private
                os.chmod(folder, PRIVATE_DIR)
            self._lock_file = os.fdopen(os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE), "r+b")
        except OSError as exc:
            raise StoreError(f"cannot use {self.root} as the job store: {exc}") from exc
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_file.close()
                raise StoreError(f"the job store {self.root} is in use by another backend server; stop it or "
                                 f"give this one another --store folder") from None
        self._records: dict[str, JobRecord] = {}
        self._by_client: dict[tuple[str, str], str] = {}  # (owner, client_job_id) -> job id
        self._load()

    # -- reading ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._records.get(job_id)

    def find(self, owner: str, client_job_id: str | None) -> JobRecord | None:
        """The job `owner` submitted under `client_job_id`, if the store holds it (a submit sent again)."""
        with self._lock:
            job_id = self._by_client.get((owner, client_job_id)) if client_job_id else None
            return self._records.get(job_id) if job_id else None

    def pending(self) -> list[JobRecord]:
        """Jobs that have not ended (queued, or running when the server stopped), oldest first."""
        with self._lock:
            return sorted((r for r in self._records.values() if not r.terminal), key=lambda r: r.created)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(r.size for r in self._records.values())

    def has_room(self, nbytes: int) -> bool:
        """Whether a new job of `nbytes` fits under the size cap, once what may go is purged."""
        self.purge()
        return self.total_bytes() + nbytes <= self.max_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def image(self, job_id: str) -> bytes:
        return (self._dir(job_id) / INPUT).read_bytes()

    def has_ovoxel(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._records and (self._dir(job_id) / OVOXEL).is_file()

    def load_ovoxel(self, job_id: str) -> OVoxel:
        return OVoxel.load(self._dir(job_id) / OVOXEL)

    def has_mesh(self, job_id: str) -> bool:
        return (self._dir(job_id) / MESH).is_file()

    def load_mesh(self, job_id: str) -> dict[str, np.ndarray]:
        """A texture job's mesh arrays, as its request carried them."""
        with np.load(self._dir(job_id) / MESH, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def terminal(self, job_id: str) -> Terminal | None:
        """The job's terminal message as it was first sent, or None while the job has not ended."""
        with self._lock:
            record = self._records.get(job_id)
            if record is None or not record.terminal:
                return None
            if record.state == "cancelled":
                return Cancelled(job_id)
            try:
                if record.state == "error":
                    err = record.error or {}
                    return Error(ErrorCode(err["code"]), err["message"], err.get("hint", ""), job_id)
                arrays: dict[str, dict[str, np.ndarray]] = {"mesh": {}, "textures": {}}
                with np.load(self._dir(job_id) / RESULT, allow_pickle=False) as npz:
                    for key in npz.files:
                        kind, name = key.split(".", 1)
                        arrays[kind][name] = npz[key]
                return Result(job_id, arrays["mesh"], arrays["textures"], record.metadata)
            except Exception as exc:  # damaged or removed behind our back: say so instead of failing the fetch
                return Error(ErrorCode.INTERNAL_ERROR, f"the stored outcome of job {job_id} cannot be read "
                             f"({type(exc).__name__}: {exc})", "submit the job again", job_id)

    # -- writing ----------------------------------------------------------------------------------

    def create(self, job_id: str, kind: str, settings: dict[str, Any], *, image: bytes | None = None,
               mesh: dict[str, np.ndarray] | None = None, source_job_id: str | None = None,
               client_job_id: str | None = None, owner: str = "") -> JobRecord:
        """Persist a new queued job (its image and mesh first, if it has them, then its record)."""
        if not NAME_PATTERN.fullmatch(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        record = JobRecord(job_id, time.time(), kind, settings, source_job_id, client_job_id, owner)
        with self._lock:
            if job_id in self._records:
                raise ValueError(f"job {job_id} exists already")
            folder = self._dir(job_id)
            folder.mkdir(mode=PRIVATE_DIR)
            try:
                if image is not None:
                    atomic_write(folder / INPUT, image)
                if mesh is not None:
                    atomic_write(folder / MESH, _npz(mesh))
                self._write_record(record)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._add(record)
            self._resize(job_id)  # its input counts toward the cap from now on
        return record

    def save_ovoxel(self, job_id: str, ovoxel: OVoxel) -> None:
        atomic_write(self._dir(job_id) / OVOXEL, ovoxel.to_bytes())  # outside the lock: compressing takes a while
        with self._lock:
            self._resize(job_id)

    def share_ovoxel(self, source_id: str, job_id: str) -> None:
        """Give a re-processing job its source's O-Voxel (and a texture job's mesh), hard links where possible, so
        it can be re-processed again even after the source is purged."""
        with self._lock:
            if not self.has_ovoxel(source_id):
                raise MissingOVoxel(f"job {source_id} has no stored O-Voxel any more (it was purged)")
            for name in (OVOXEL, MESH):
                src, dst = self._dir(source_id) / name, self._dir(job_id) / name
                if not src.is_file():
                    continue
                tmp = dst.with_name(dst.name + TMP_SUFFIX)
                tmp.unlink(missing_ok=True)
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
                    os.chmod(tmp, PRIVATE_FILE)
                os.replace(tmp, dst)
            self._resize(job_id)

    def finish(self, job_id: str, message: Terminal) -> bool:
        """Record the job's end. False (and nothing recorded) when it had ended already: one terminal per job."""
        if self._ended(job_id):
            return False
        folder = self._dir(job_id)
        state, error, metadata = message.TYPE, None, {}
        if isinstance(message, Result):  # written outside the lock, so a big result never stalls the I/O thread
            arrays = {f"mesh.{k}": v for k, v in message.mesh.items()}
            arrays.update({f"textures.{k}": v for k, v in message.textures.items()})
            atomic_write(folder / RESULT, _npz(arrays))
            metadata = message.metadata
        elif isinstance(message, Error):
            error = {"code": message.code.value, "message": message.message, "hint": message.hint}
        with self._lock:
            if self._ended(job_id):
                return False
            done = replace(self._records[job_id], state=state, finished=time.time(), error=error,
                           metadata=metadata, delivered=False)
            self._write_record(done)
            (folder / INPUT).unlink(missing_ok=True)
            self._records[job_id] = done
            self._resize(job_id)
            return True

    def mark_delivered(self, job_id: str) -> None:
        """Remember that a client got the terminal message; such jobs are purged first when space runs out."""
        with self._lock:
            record = self._records.get(job_id)
            if record is not None and record.terminal and not record.delivered:
                record.delivered = True
                self._write_record(record)

    def purge(self, now: float | None = None) -> list[str]:
        """Remove ended jobs older than the age limit, then the oldest ones while over the size cap."""
        now = time.time() if now is None else now
        removed = []
        with self._lock:
            ended = sorted((r for r in self._records.values() if r.terminal),
                           key=lambda r: (not r.delivered, r.finished or r.created))
            total = self.total_bytes()
            for record in ended:
                expired = now - (record.finished or record.created) > self.max_age_s
                if expired or total > self.max_bytes:
                    shutil.rmtree(self._dir(record.job_id), ignore_errors=True)
                    del self._records[record.job_id]
                    self._by_client.pop((record.owner, record.client_job_id), None)
                    total -= record.size
                    removed.append(record.job_id)
        if removed:
            log.info("store: purged %d ended job(s), %d bytes left", len(removed), total)
        return removed

    def close(self) -> None:
        self._lock_file.close()  # releases the flock

    # -- internals --------------------------------------------------------------------------------

    def _ended(self, job_id: str) -> bool:
        with self._lock:
            record = self._records.get(job_id)
            return record is None or record.terminal

    def _add(self, record: JobRecord) -> None:
        self._records[record.job_id] = record
        if record.client_job_id:
            self._by_client[(record.owner, record.client_job_id)] = record.job_id

    def _dir(self, job_id: str) -> Path:
        return self._jobs_dir / job_id

    def _write_record(self, record: JobRecord) -> None:
        atomic_write(self._dir(record.job_id) / RECORD, json.dumps(asdict(record)).encode())

    def _resize(self, job_id: str) -> None:
        self._records[job_id].size = sum(p.stat().st_size for p in self._dir(job_id).iterdir())

    def _load(self) -> None:
        """Read every job folder; drop leftovers of interrupted writes and folders without a readable record."""
        for folder in self._jobs_dir.iterdir():
            if not folder.is_dir():
                continue
            for tmp in folder.glob("*" + TMP_SUFFIX):
                tmp.unlink(missing_ok=True)
            try:
                record = JobRecord(**json.loads((folder / RECORD).read_text()))
                if record.job_id != folder.name or not NAME_PATTERN.fullmatch(record.job_id):
                    raise ValueError(f"record names job {record.job_id!r}")
            except (OSError, ValueError, TypeError) as exc:
                # A submit that died before its record was written: the client never got `accepted`.
                log.warning("store: removing %s, which has no usable record (%s)", folder, exc)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if record.terminal:  # a crash between the final record and the input's removal
                (folder / INPUT).unlink(missing_ok=True)
            os.chmod(folder, PRIVATE_DIR)
            self._add(record)
            self._resize(record.job_id)


def _npz(arrays: dict[str, np.ndarray]) -> memoryview:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer()
