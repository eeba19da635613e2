"""The one GPU worker: loads the engine once in the background, then runs queued jobs one at a time.

A generate job makes the O-Voxel (engine.generate), stores it, then builds the textured mesh (engine.build_asset); a
reprocess job takes a stored O-Voxel and only builds, and so does a generate job whose O-Voxel was stored before a
restart interrupted it. The worker never talks to sockets: it hands messages
(progress and each job's single terminal message, already recorded in the store) to `emit`, which the server's I/O
thread delivers. Cancellation and shutdown are flags checked by the progress callback between steps. It knows jobs,
not models: the engine (backend/engine.py, imported only when the worker loads it) plans each job's stages and
raises `backend.errors.JobFailure` for anything a user can act on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from backend.errors import JobFailure
from backend.progress import StageFraction, StopRequested
from backend.server.requests import JobSpec, spec_metadata
from backend.server.results import result_message
from backend.server.store import JobStore, MissingOVoxel, Terminal
from protocol import Cancelled, Error, ErrorCode, InvalidSettings, Message, ModelStatus, Progress, Schema
from protocol.settings import GENERATE, REPROCESS, SETTINGS

if TYPE_CHECKING:
    from backend.engine import Engine

log = logging.getLogger(__name__)

IDLE_REFRESH_S = 2.0  # how often an idle worker refreshes the GPU memory figures for `info`
BUSY_REFRESH_S = 1.0
PROGRESS_INTERVAL_S = 0.1  # at most this often per job, except at stage changes and stage ends
MAX_ERROR_TEXT = 2000  # exception texts can embed whole tensors; keep error messages readable


@dataclass
class QueuedJob:
    job_id: str
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)


class JobProgress:
    """Turns the engine's (stage, step, total) calls into Progress messages with an overall fraction over the job's
    planned stages, and times stages: one log line per finished stage, and the timings for the result's metadata."""

    def __init__(self, job_id: str, fraction: StageFraction) -> None:
        self.job_id = job_id
        self.timings: dict[str, float] = {}
        self._fraction = fraction
        self._stage = ""
        self._stage_start = self._last_sent = time.monotonic()

    def update(self, stage: str, step: int, total: int) -> Progress | None:
        now = time.monotonic()
        new_stage = stage != self._stage
        if new_stage:
            self.close_stage(now)
            self._stage, self._stage_start = stage, now
        fraction = self._fraction.update(stage, step, total)
        step, total = max(0, step), max(0, total)
        if not (new_stage or (total and step >= total) or now - self._last_sent >= PROGRESS_INTERVAL_S):
            return None
        self._last_sent = now
        return Progress(self.job_id, stage, min(step, total) if total else step, total, fraction)

    def close_stage(self, now: float | None = None) -> None:
        if self._stage:
            seconds = (now or time.monotonic()) - self._stage_start
            self.timings[self._stage] = self.timings.get(self._stage, 0.0) + seconds
            log.info("job %s stage %s %.2fs", self.job_id, self._stage, seconds)
            self._stage = ""


class Worker:
    """One thread owning the engine and a FIFO of jobs. Thread-safe calls from the server's I/O thread:
    submit, cancel, queue_length, waiting, running, stop, interrupt, schema. The server bounds the queue."""

    def __init__(self, store: JobStore, load: Callable[[], Engine], emit: Callable[[Message], None],
                 device_hint: str = "auto") -> None:
        self.store, self._load, self._emit = store, load, emit
        self.status = ModelStatus.NOT_LOADED
        self.load_error = ""
        self.device = device_hint
        self.gpu_memory: tuple[int | None, int | None] = (None, None)
        self._engine: Engine | None = None
        self._cond = threading.Condition()
        self._queue: deque[QueuedJob] = deque()
        self._running: QueuedJob | None = None
        self._stopping = False
        self._interrupt = threading.Event()
        self._thread = threading.Thread(target=self._main, name="gpu-worker", daemon=True)
        self._memory_checked = 0.0

    # -- called from the I/O thread ---------------------------------------------------------------

    @property
    def schema(self) -> Schema:
        """The settings schema jobs are checked against: the engine's (its checkpoint's defaults) once loaded."""
        engine = self._engine
        return engine.schema if engine is not None else SETTINGS

    @property
    def capabilities(self) -> tuple[str, ...]:
        engine = self._engine
        return engine.capabilities if engine is not None else ()

    @property
    def versions(self) -> dict[str, str | None]:
        """The engine's library versions (torch, CUDA) for `info`, once loaded."""
        engine = self._engine
        return engine.versions() if engine is not None else {}

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: QueuedJob) -> int:
        """Queue `job`; returns its queue position (0: it runs now)."""
        with self._cond:
            self._queue.append(job)
            self._cond.notify()
            return len(self._queue) - (0 if self._running is not None else 1)

    def cancel(self, job_id: str) -> str | None:
        """Where the job was: "queued" (removed, it never runs; the caller ends it), "running" (it stops at its
        next step), or None (the worker does not hold it)."""
        with self._cond:
            for job in self._queue:
                if job.job_id == job_id:
                    self._queue.remove(job)
                    return "queued"
            if self._running is not None and self._running.job_id == job_id:
                self._running.cancel.set()
                return "running"
        return None

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def waiting(self) -> list[str]:
        with self._cond:
            return [job.job_id for job in self._queue]

    def running(self) -> str | None:
        with self._cond:
            return self._running.job_id if self._running else None

    def stop(self) -> None:
        """Take no further job; the running one goes on (see `interrupt`). Queued jobs stay queued on disk."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def interrupt(self) -> None:
        """Stop the running job at its next step and leave it queued on disk, to run again after a restart."""
        self.stop()
        self._interrupt.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------------

    def _main(self) -> None:
        self._load_engine()
        while (job := self._take()) is not None:
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._running = None

    def _load_engine(self) -> None:
        self.status = ModelStatus.LOADING
        started = time.monotonic()
        log.info("loading models")
        try:
            self._engine = self._load()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.status = ModelStatus.FAILED
            log.exception("loading the models failed; jobs will be refused")
            return
        self.device = self._engine.device
        self._refresh_memory(force=True)
        self.status = ModelStatus.READY
        log.info("models ready on %s in %.1fs", self.device, time.monotonic() - started)

    def _take(self) -> QueuedJob | None:
        while True:
            with self._cond:
                if self._stopping:
                    return None
                if self._queue:
                    self._running = self._queue.popleft()
                    return self._running
                self._cond.wait(IDLE_REFRESH_S)
            self._refresh_memory()

    def _refresh_memory(self, force: bool = False) -> None:
        """Refreshed here, on the worker thread, so `info` never waits for the GPU."""
        now = time.monotonic()
        if self._engine is None or (not force and now - self._memory_checked < BUSY_REFRESH_S):
            return
        self._memory_checked = now
        try:
            self.gpu_memory = self._engine.memory()
        except Exception:  # a sick driver must not kill the worker; `info` then shows no figures
            self.gpu_memory = (None, None)

    def _execute(self, job: QueuedJob) -> None:
        started = time.monotonic()
        spec, engine = job.spec, self._engine
        log.info("job %s (%s) started", job.job_id, spec.kind)
        meter: JobProgress | None = None
        try:
            if engine is None:
                raise _ModelNotReady(self.load_error)
            settings = engine.schema.resolve(spec.kind, spec.settings)
            meter = JobProgress(job.job_id, StageFraction(engine.plan(spec.kind, settings)))

            def progress(stage: str, step: int, total: int) -> None:
                if job.cancel.is_set() or self._interrupt.is_set():
                    raise StopRequested(f"job {job.job_id} stopped")
                self._refresh_memory()
                message = meter.update(stage, step, total)
                if message is not None:
                    self._emit(message)

            if spec.kind == REPROCESS:
                self.store.share_ovoxel(spec.source_job_id, job.job_id)
                ovoxel = self.store.load_ovoxel(job.job_id)
            elif spec.kind == GENERATE and self.store.has_ovoxel(job.job_id):  # generated before a restart
                log.info("job %s resumes from its stored O-Voxel: only the asset is built", job.job_id)
                ovoxel = self.store.load_ovoxel(job.job_id)
            elif spec.kind == GENERATE:
                ovoxel = engine.generate(self.store.image(job.job_id), settings, progress)
                self.store.save_ovoxel(job.job_id, ovoxel)
            else:
                raise JobFailure(f"this server cannot run {spec.kind} jobs", "update the backend")
            mesh = engine.build_asset(ovoxel, settings, progress)
            meter.close_stage()
            meta = {**spec_metadata(spec, settings), "ovoxel": ovoxel.metadata,
                    "timings": {**meter.timings, "total": time.monotonic() - started},
                    "vertex_count": int(len(mesh.positions)), "face_count": int(len(mesh.indices))}
            outcome: Terminal = result_message(job.job_id, mesh, meta)
        except Exception as exc:
            if meter is not None:
                meter.close_stage()
            if job.cancel.is_set():
                outcome = Cancelled(job.job_id)
            elif self._interrupt.is_set():
                log.info("job %s interrupted by shutdown after %.2fs; it stays queued and runs after a restart",
                         job.job_id, time.monotonic() - started)
                return
            else:
                outcome = failure_error(job.job_id, exc)
                if outcome.code == ErrorCode.INTERNAL_ERROR:
                    log.exception("job %s failed unexpectedly", job.job_id)
        self._finish(outcome, time.monotonic() - started)

    def _finish(self, outcome: Terminal, seconds: float) -> None:
        """Record the outcome, then hand it over; if even recording fails, the client still hears why."""
        try:
            first = self.store.finish(outcome.job_id, outcome)
        except Exception as exc:
            log.exception("job %s: storing its outcome failed", outcome.job_id)
            outcome = Error(ErrorCode.INTERNAL_ERROR, f"the server could not store the job's outcome: {exc}",
                            "free disk space in the server's --store folder, then submit again", outcome.job_id)
            first = True
        if not first:
            return
        if isinstance(outcome, Error):
            log.info("job %s error %s after %.2fs: %s", outcome.job_id, outcome.code.value, seconds, outcome.message)
        else:
            log.info("job %s %s after %.2fs", outcome.job_id, outcome.TYPE, seconds)
        self._emit(outcome)


class _ModelNotReady(Exception):
    pass


def failure_error(job_id: str, exc: BaseException) -> Error:
    """The `error` message for a job that raised `exc`; anything unforeseen is an internal error."""
    if isinstance(exc, JobFailure):
        return Error(ErrorCode(exc.code), _text(exc.message), exc.hint, job_id)
    if isinstance(exc, InvalidSettings):  # settings a restarted server's checkpoint no longer accepts
        return Error.from_exception(exc, job_id=job_id)
    if isinstance(exc, _ModelNotReady):
        return Error(ErrorCode.MODEL_NOT_READY, _text(f"the models failed to load: {exc}"),
                     "fix the cause in the server log and restart the server", job_id)
    if isinstance(exc, MissingOVoxel):
        return Error(ErrorCode.UNKNOWN_JOB, str(exc), "generate it again", job_id)
    if isinstance(exc, MemoryError):
        return Error(ErrorCode.OUT_OF_MEMORY, "the server ran out of memory",
                     "ask for fewer faces or a smaller texture_size, or free memory on the server", job_id)
    return Error(ErrorCode.INTERNAL_ERROR, _text(f"{type(exc).__name__}: {exc}"),
                 "the server log has the traceback; please report it", job_id)


def _text(message: str) -> str:
    return message if len(message) <= MAX_ERROR_TEXT else message[:MAX_ERROR_TEXT] + " ..."

