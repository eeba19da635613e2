"""The one GPU worker: loads the models once in the background, then runs queued jobs one at a time.

A job is: generate the O-Voxel (pipeline) and store it, then build the textured mesh (asset step); a re-processing
job takes a stored O-Voxel and only builds. The worker never talks to sockets: it hands messages (progress and each
job's single terminal message, already recorded in the store) to `emit`, which the server's I/O thread delivers.
Cancellation and shutdown are flags checked by the progress callback between steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from backend.ovoxel.ovoxel import OVoxel
from backend.asset.textured_mesh import AssetSettings, TexturedMesh
from backend.server.jobs import JobSpec, failure_error, result_message, spec_metadata
from backend.server.store import JobStore, Terminal
from protocol import Cancelled, Error, ErrorCode, Message, ModelStatus, Progress

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
AssetBuilder = Callable[[OVoxel, AssetSettings, ProgressFn], TexturedMesh]
IDLE_REFRESH_S = 2.0  # how often an idle worker refreshes the GPU memory figures for `info`
BUSY_REFRESH_S = 1.0
PROGRESS_INTERVAL_S = 0.1  # at most this often per job, except at stage changes and stage ends
# Where each pipeline stage sits in a job's overall progress; asset building takes the rest.
GENERATION_SPANS = {
    "preprocess": (0.0, 0.03), "condition": (0.03, 0.06), "sparse_structure": (0.06, 0.2),
    "shape": (0.2, 0.5), "shape_lr": (0.2, 0.3), "upsample": (0.3, 0.33), "shape_hr": (0.33, 0.5),
    "texture": (0.5, 0.75), "decode": (0.75, 0.8),
}


@dataclass
class Engine:
    """What jobs run on, loaded once. Tests build one around the tiny checkpoint and their own asset step."""

    generate: Callable[[bytes, Any, ProgressFn], OVoxel]  # (image file, GenerationSettings, progress)
    build_asset: AssetBuilder
    device: str  # for people: "cuda:0 NVIDIA H100", "cpu"
    cancelled: type[Exception]  # what the progress callback raises to stop a job between steps
    memory: Callable[[], tuple[int | None, int | None]] = lambda: (None, None)  # free, total GPU bytes


def load_engine(weights: str | None, device: str | None = None, memory: str = "auto",
                build_asset: AssetBuilder | None = None) -> Engine:
    """The real engine: TRELLIS.2 from `weights` and, unless given, backend.asset.postprocess for the asset."""
    import torch

    from backend.trellis2.pipeline import DEFAULT_WEIGHTS, JobCancelled, Trellis2Pipeline

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = Trellis2Pipeline.from_pretrained(weights or DEFAULT_WEIGHTS, device=dev, memory=memory)
    if build_asset is None:
        from backend.asset.postprocess import build_textured_mesh

        build_asset = partial(build_textured_mesh, device=dev)
    if dev.type != "cuda":
        return Engine(pipeline.run, build_asset, str(dev), JobCancelled)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return Engine(pipeline.run, build_asset, f"cuda:{index} {torch.cuda.get_device_name(index)}", JobCancelled,
                  partial(torch.cuda.mem_get_info, index))


@dataclass
class Job:
    job_id: str
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)


class JobProgress:
    """Turns the pipeline's (stage, step, total) calls into Progress messages with an overall fraction, and times
    stages: one log line per finished stage, and the timings for the result's metadata."""

    def __init__(self, job_id: str, reprocess: bool) -> None:
        self.job_id = job_id
        self.asset_start = 0.0 if reprocess else GENERATION_SPANS["decode"][1]
        self.timings: dict[str, float] = {}
        self.fraction = 0.0
        self._stage = ""
        self._span = (0.0, 0.0)
        self._stage_start = self._last_sent = time.monotonic()

    def update(self, stage: str, step: int, total: int) -> Progress | None:
        now = time.monotonic()
        new_stage = stage != self._stage
        if new_stage:
            self.close_stage(now)
            self._stage, self._stage_start = stage, now
            # Asset stages are not known in advance: each takes half of what is left.
            start = max(self.fraction, self.asset_start)
            self._span = GENERATION_SPANS.get(stage) or (start, (start + 1.0) / 2)
        step, total = max(0, step), max(0, total)
        within = min(step / total, 1.0) if total else 0.0
        self.fraction = max(self.fraction, self._span[0] + (self._span[1] - self._span[0]) * within)
        if not (new_stage or (total and step >= total) or now - self._last_sent >= PROGRESS_INTERVAL_S):
            return None
        self._last_sent = now
        return Progress(self.job_id, stage, min(step, total) if total else step, total, min(self.fraction, 1.0))

    def close_stage(self, now: float | None = None) -> None:
        if self._stage:
            seconds = (now or time.monotonic()) - self._stage_start
            self.timings[self._stage] = self.timings.get(self._stage, 0.0) + seconds
            log.info("job %s stage %s %.2fs", self.job_id, self._stage, seconds)
            self._stage = ""


class Worker:
    """One thread owning the engine and a FIFO of jobs. Thread-safe calls from the server's I/O thread:
    submit, cancel, queue_length, waiting, running, stop, interrupt. The server bounds the queue."""

    def __init__(self, store: JobStore, load: Callable[[], Engine], emit: Callable[[Message], None],
                 device_hint: str = "auto") -> None:
        self.store, self._load, self._emit = store, load, emit
        self.status = ModelStatus.NOT_LOADED
        self.load_error = ""
        self.device = device_hint
        self.gpu_memory: tuple[int | None, int | None] = (None, None)
        self._engine: Engine | None = None
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._interrupt = threading.Event()
        self._thread = threading.Thread(target=self._main, name="gpu-worker", daemon=True)
        self._memory_checked = 0.0

    # -- called from the I/O thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> int:
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

    def _take(self) -> Job | None:
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

    def _execute(self, job: Job) -> None:
        started = time.monotonic()
        spec, engine = job.spec, self._engine
        meter = JobProgress(job.job_id, reprocess=spec.reprocess_job is not None)
        log.info("job %s started", job.job_id)
        try:
            if engine is None:
                raise _ModelNotReady(self.load_error)

            def progress(stage: str, step: int, total: int) -> None:
                if job.cancel.is_set() or self._interrupt.is_set():
                    raise engine.cancelled(f"job {job.job_id} stopped")
                self._refresh_memory()
                message = meter.update(stage, step, total)
                if message is not None:
                    self._emit(message)

            if spec.reprocess_job is not None:
                self.store.share_ovoxel(spec.reprocess_job, job.job_id)
                ovoxel = self.store.load_ovoxel(job.job_id)
            else:
                ovoxel = engine.generate(self.store.image(job.job_id), spec.generation, progress)
                self.store.save_ovoxel(job.job_id, ovoxel)
            mesh = engine.build_asset(ovoxel, spec.asset, progress)
            meter.close_stage()
            meta = {**spec_metadata(spec), "ovoxel": ovoxel.metadata,
                    "timings": {**meter.timings, "total": time.monotonic() - started},
                    "vertex_count": int(len(mesh.positions)), "face_count": int(len(mesh.indices))}
            outcome: Terminal = result_message(job.job_id, mesh, meta)
        except Exception as exc:
            meter.close_stage()
            if job.cancel.is_set():
                outcome = Cancelled(job.job_id)
            elif self._interrupt.is_set():
                log.info("job %s interrupted by shutdown after %.2fs; it stays queued and runs after a restart",
                         job.job_id, time.monotonic() - started)
                return
            elif isinstance(exc, _ModelNotReady):
                outcome = Error(ErrorCode.MODEL_NOT_READY, f"the models failed to load: {exc}",
                                "fix the cause in the server log and restart the server", job.job_id)
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
