"""A worker: loads the engine once, runs the jobs it is given and reports everything as events.

The same class runs wherever a worker lives: on a thread of the server process (the default `serve`), in a worker
process of its own (`--gpus`, `--workers`, worker_process.py) or in a cluster actor (`--cluster`, cluster.py). It
never touches sockets or the job store: it gets a `JobOrder` (the job's spec and inputs) and hands its `outbox` the
events the pool (pool.py) turns into store writes and client messages: `Loaded` / `LoadFailed` once, a `Heartbeat`
every second, `Ready` whenever it can start one more job, protocol `Progress` messages, `Generated` (the O-Voxel, to
store) and one `Finished` per job. Every event is plain picklable data, so it crosses a pipe or a cluster's object
store unchanged.

A job's generation runs on the generation lane; its asset step on the asset lane, which with `overlap` is a thread of
its own: while one job's asset step runs, the next job's generation may start when the GPU's free memory covers both
steps' measured peaks (measured while each ran alone). Without `overlap` both lanes are one thread and jobs run one
at a time. Cancellation and interruption are flags checked by the progress callback between steps. It knows jobs,
not models: the engine (backend/engine.py, imported only by the loader) plans each job's stages and raises
`backend.errors.JobFailure` for anything a user can act on.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from backend.errors import JobFailure, OutOfMemory
from backend.ovoxel.ovoxel import OVoxel
from backend.progress import StageFraction, StopRequested, loading_reported_to
from backend.server.requests import JobSpec, spec_metadata
from backend.server.results import result_message, texture_result_message
from backend.server.store import MissingOVoxel, Terminal
from protocol import Cancelled, Error, ErrorCode, InvalidSettings, Progress, Schema
from protocol.settings import GENERATE, REPROCESS, TEXTURE

if TYPE_CHECKING:
    from backend.engine import Engine

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # how often a worker reports that it is alive, with fresh GPU memory figures
PROGRESS_INTERVAL_S = 0.1  # at most this often per job, except at stage changes and stage ends
LOADING_INTERVAL_S = 0.5  # at most this often while loading, except at the end of each file or model
MAX_ERROR_TEXT = 2000  # exception texts can embed whole tensors; keep error messages readable
# When the models could not be loaded: the load's own message (it names what is missing) says what to do first.
MODEL_NOT_READY_HINT = "do what the message says, then restart the backend (the add-on: its Start Backend button)"
OVERLAP_MARGIN = 1.15  # free memory must exceed the two steps' measured peaks by this factor to overlap them

Loader = Callable[[], "Engine"]


# -- what a worker is given and what it reports ---------------------------------------------------------------

@dataclass(frozen=True)
class JobOrder:
    """A job as a worker gets it: its spec and its inputs, read from the store by the pool."""

    job_id: str
    spec: JobSpec
    image: bytes | None = None  # generate, texture
    ovoxel: OVoxel | None = None  # reprocess: the source job's O-Voxel; generate, texture: its own, stored before a
    # restart (only the asset step or bake is left to do)
    mesh: dict[str, np.ndarray] | None = None  # texture (and the reprocess of one): the caller's mesh arrays


@dataclass(frozen=True)
class WorkerFacts:
    """What a loaded worker says about itself, for `info` and each result's metadata."""

    name: str
    host: str
    pid: int
    device: str
    models: tuple[str, ...]
    capabilities: tuple[str, ...]
    versions: dict[str, str | None]
    schema: Schema


@dataclass(frozen=True)
class Loaded:
    facts: WorkerFacts


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class Loading:
    """Where loading is: downloading a file (bytes) or reading models (count), for `info` and waiting jobs."""

    phase: str
    item: str
    done: int
    total: int


@dataclass(frozen=True)
class Heartbeat:
    gpu_memory: tuple[int | None, int | None]


@dataclass(frozen=True)
class Ready:
    """The worker can start one more job now; it offers itself once until it is given one."""


@dataclass(frozen=True)
class Generated:
    job_id: str
    ovoxel: OVoxel


@dataclass(frozen=True)
class Finished:
    """A job's end: its terminal message, or None when it was interrupted by shutdown (it stays queued)."""

    job_id: str
    outcome: Terminal | None
    seconds: float


Event = Loaded | LoadFailed | Loading | Heartbeat | Ready | Progress | Generated | Finished


class WorkerLost(Exception):
    """A worker is gone (its process exited, its cluster actor died); the text says how."""


class EventQueue:
    """A worker's outbox where its reader is in the same process (the embedded worker, a cluster actor)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.put = self._queue.put

    def drain(self, timeout: float) -> list[Event]:
        """Every event there is, waiting up to `timeout` for the first."""
        try:
            events = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events


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


@dataclass
class _Job:
    """A job inside the worker, from its order to its end."""

    order: JobOrder
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    settings: dict[str, Any] = field(default_factory=dict)
    meter: JobProgress | None = None
    ovoxel: OVoxel | None = None
    overlapped: bool = False  # its generation started while another job's asset step ran

    @property
    def job_id(self) -> str:
        return self.order.job_id


class EngineWorker:
    """Owns one engine and at most two jobs (one per lane). `run`, `cancel`, `interrupt` and `close` are
    thread-safe; `run` is called only after the worker offered itself with `Ready`."""

    def __init__(self, name: str, load: Loader, outbox: Callable[[Event], None], overlap: bool = False) -> None:
        self.name = name
        self._load, self._outbox, self._overlap = load, outbox, overlap
        self._loading_sent = 0.0
        self._engine: Engine | None = None
        self._facts: WorkerFacts | None = None
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._generating: _Job | None = None  # on the generation lane
        self._building: _Job | None = None  # on the asset lane (overlap only)
        self._offered = False
        self._interrupt = threading.Event()
        self._closed = threading.Event()
        self._orders: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._builds: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._peaks = {"generate": 0, "build": 0}  # bytes above the start, measured while the step ran alone
        self._threads = [threading.Thread(target=self._generation_lane, name="worker-generate", daemon=True),
                         threading.Thread(target=self._heartbeat, name="worker-heartbeat", daemon=True)]
        if overlap:
            self._threads.append(threading.Thread(target=self._asset_lane, name="worker-asset", daemon=True))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def run(self, order: JobOrder) -> None:
        job = _Job(order)
        with self._lock:
            self._offered = False
            self._jobs[job.job_id] = job
        self._orders.put(job)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.cancel.set()

    def interrupt(self) -> None:
        """Stop the running jobs at their next step; they end with no outcome (they stay queued on disk)."""
        self._interrupt.set()

    def close(self, timeout: float | None = None) -> None:
        self._closed.set()
        self._orders.put(None)
        self._builds.put(None)
        for thread in self._threads:
            thread.join(timeout)

    # -- lanes ------------------------------------------------------------------------------------

    def _generation_lane(self) -> None:
        if not self._load_engine():
            return
        self._offer()
        while (job := self._orders.get()) is not None:
            self._generate(job)
            if job.ovoxel is None:  # it ended in generation
                self._offer()
            elif self._overlap:
                self._builds.put(job)
            else:
                self._build(job)
                self._offer()

    def _asset_lane(self) -> None:
        while (job := self._builds.get()) is not None:
            with self._lock:
                self._building = job
                self._generating = None if self._generating is job else self._generating
            self._offer()  # the generation lane is free: the next job may start, if memory allows
            self._build(job)
            with self._lock:
                self._building = None
            self._offer()

    def _load_engine(self) -> bool:
        started = time.monotonic()
        log.info("loading models")
        try:
            with loading_reported_to(self._report_loading):
                self._engine = engine = self._load()
            self._facts = facts = WorkerFacts(self.name, socket.gethostname(), os.getpid(), engine.device,
                                              tuple(engine.models()), tuple(engine.capabilities), engine.versions(),
                                              engine.schema)
        except Exception as exc:
            log.exception("loading the models failed; this worker takes no jobs")
            self._outbox(LoadFailed(f"{type(exc).__name__}: {exc}"))
            return False
        log.info("models ready on %s in %.1fs", facts.device, time.monotonic() - started)
        self._outbox(Loaded(facts))
        return True

    def _report_loading(self, phase: str, item: str, done: int, total: int) -> None:
        """At most a few reports a second (a download reports every chunk), and always the end of an item."""
        now = time.monotonic()
        if now - self._loading_sent >= LOADING_INTERVAL_S or done >= total:
            self._loading_sent = now
            self._outbox(Loading(phase, item, done, total))

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S):
            engine = self._engine
            try:
                memory = engine.memory() if engine is not None else (None, None)
            except Exception:  # a sick driver must not stop the heartbeat; `info` then shows no figures
                memory = (None, None)
            self._outbox(Heartbeat(memory))

    def _offer(self) -> None:
        """Offer `Ready` once the generation lane is free and, while an asset step runs, memory allows."""
        with self._lock:
            if self._offered or self._closed.is_set() or self._interrupt.is_set() or self._generating is not None:
                return
            if self._building is not None and not self._memory_allows_overlap():
                return
            self._offered = True
        self._outbox(Ready())

    def _memory_allows_overlap(self) -> bool:
        engine = self._engine
        available = engine.available_memory() if engine is not None else None
        return overlap_fits(available, self._peaks["generate"], self._peaks["build"])

    # -- one job ----------------------------------------------------------------------------------

    def _generate(self, job: _Job) -> None:
        """Plan the job and, for a generate job, make its O-Voxel; on failure the job ends here."""
        with self._lock:
            self._generating = job
            job.overlapped = self._building is not None
        engine, spec = self._engine, job.order.spec
        log.info("job %s (%s) started%s", job.job_id, spec.kind, " beside another job's asset step"
                 if job.overlapped else "")
        try:
            job.settings = engine.schema.resolve(spec.kind, spec.settings)
            onto_mesh = job.order.mesh is not None
            job.meter = JobProgress(job.job_id, StageFraction(engine.plan(spec.kind, job.settings, onto_mesh)))
            if spec.kind == REPROCESS:
                if job.order.ovoxel is None:
                    raise MissingOVoxel(f"job {spec.source_job_id} has no stored O-Voxel any more (it was purged)")
                job.ovoxel = job.order.ovoxel
            elif job.order.ovoxel is not None:  # a generate or texture job made it before a restart
                log.info("job %s resumes from its stored O-Voxel: only the asset is built", job.job_id)
                job.ovoxel = job.order.ovoxel
            elif spec.kind == GENERATE:
                job.ovoxel = self._generate_once(job)
                self._outbox(Generated(job.job_id, job.ovoxel))
            elif spec.kind == TEXTURE:
                job.ovoxel = engine.texture(job.order.image, job.order.mesh, job.settings, self._progress(job))
                self._outbox(Generated(job.job_id, job.ovoxel))
            else:
                raise JobFailure(f"this server cannot run {spec.kind} jobs", "update the backend")
        except Exception as exc:
            job.ovoxel = None
            self._end(job, exc)
        finally:
            with self._lock:
                if job.ovoxel is None or not self._overlap:
                    self._generating = None

    def _generate_once(self, job: _Job) -> OVoxel:
        """Generate; a generation that ran out of memory beside another job's asset step runs again alone."""
        engine = self._engine
        alone = not job.overlapped
        try:
            with engine.lane(measure=alone) as peak:
                ovoxel = engine.generate(job.order.image, job.settings, self._progress(job))
            if alone:
                self._peaks["generate"] = max(self._peaks["generate"], peak())
            return ovoxel
        except OutOfMemory:
            if not job.overlapped:
                raise
        log.warning("job %s ran out of memory beside another job's asset step; running it again alone", job.job_id)
        self._peaks["generate"] = 0  # overlap again only after a fresh measurement
        while self._building_other(job):
            if job.cancel.is_set() or self._interrupt.is_set():
                raise StopRequested(f"job {job.job_id} stopped")
            time.sleep(0.05)
        job.overlapped = False
        return self._generate_once(job)

    def _building_other(self, job: _Job) -> bool:
        with self._lock:
            return self._building is not None and self._building is not job

    def _build(self, job: _Job) -> None:
        engine = self._engine
        try:
            with self._lock:
                alone = self._generating is None or self._generating is job
            with engine.lane(measure=alone) as peak:
                if job.order.mesh is not None:  # textures for the caller's own mesh
                    built = engine.bake(job.ovoxel, job.order.mesh, job.settings, self._progress(job))
                else:
                    built = engine.build_asset(job.ovoxel, job.settings, self._progress(job))
            if alone:
                self._peaks["build"] = max(self._peaks["build"], peak())
            job.meter.close_stage()
            meta = {**spec_metadata(job.order.spec, job.settings), "ovoxel": job.ovoxel.metadata,
                    "timings": {**job.meter.timings, "total": time.monotonic() - job.started},
                    "worker": {"name": self.name, "host": self._facts.host, "pid": self._facts.pid,
                               "device": self._facts.device}}
            if job.order.mesh is not None:
                result = texture_result_message(job.job_id, built, meta)
            else:
                meta.update(vertex_count=int(len(built.positions)), face_count=int(len(built.indices)))
                result = result_message(job.job_id, built, meta)
            self._end(job, None, result)
        except Exception as exc:
            self._end(job, exc)

    def _progress(self, job: _Job) -> Callable[[str, int, int], None]:
        def progress(stage: str, step: int, total: int) -> None:
            if job.cancel.is_set() or self._interrupt.is_set():
                raise StopRequested(f"job {job.job_id} stopped")
            message = job.meter.update(stage, step, total)
            if message is not None:
                self._outbox(message)

        return progress

    def _end(self, job: _Job, exc: Exception | None, result: Terminal | None = None) -> None:
        if job.meter is not None:
            job.meter.close_stage()
        seconds = time.monotonic() - job.started
        outcome: Terminal | None = result
        if exc is not None:
            if job.cancel.is_set():
                outcome = Cancelled(job.job_id)
            elif self._interrupt.is_set():
                log.info("job %s interrupted by shutdown after %.2fs; it stays queued and runs after a restart",
                         job.job_id, seconds)
                outcome = None
            else:
                outcome = failure_error(job.job_id, exc)
                if outcome.code == ErrorCode.INTERNAL_ERROR:
                    log.error("job %s failed unexpectedly", job.job_id, exc_info=exc)
        with self._lock:
            self._jobs.pop(job.job_id, None)
        self._outbox(Finished(job.job_id, outcome, seconds))


def overlap_fits(available: int | None, generate_peak: int, build_peak: int) -> bool:
    """Whether a generation may start beside an asset step: off the GPU (`available` None) always; on it, once both
    steps' peaks have been measured alone, when the memory this process can still allocate covers both with a
    margin (the asset step may not have reached its own peak yet)."""
    if available is None:
        return True
    return generate_peak > 0 and build_peak > 0 and available >= OVERLAP_MARGIN * (generate_peak + build_peak)


def failure_error(job_id: str, exc: BaseException) -> Error:
    """The `error` message for a job that raised `exc`; anything unforeseen is an internal error."""
    if isinstance(exc, JobFailure):
        return Error(ErrorCode(exc.code), _text(exc.message), exc.hint, job_id)
    if isinstance(exc, InvalidSettings):  # settings a restarted server's checkpoint no longer accepts
        return Error.from_exception(exc, job_id=job_id)
    if isinstance(exc, MissingOVoxel):
        return Error(ErrorCode.UNKNOWN_JOB, str(exc), "generate it again", job_id)
    if isinstance(exc, MemoryError):
        return Error(ErrorCode.OUT_OF_MEMORY, "the server ran out of memory",
                     "ask for fewer faces or a smaller texture_size, or free memory on the server", job_id)
    return Error(ErrorCode.INTERNAL_ERROR, _text(f"{type(exc).__name__}: {exc}"),
                 "the server log has the traceback; please report it", job_id)


def _text(message: str) -> str:
    return message if len(message) <= MAX_ERROR_TEXT else message[:MAX_ERROR_TEXT] + " ..."
