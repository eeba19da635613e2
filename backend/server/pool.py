"""The workers behind the server: one FIFO of jobs, handed to whichever worker is free, and what happens when one fails.

`serve` alone keeps one worker on a thread of the server process (`ThreadTransport`). `--workers N` and `--gpus` give
each worker a process of its own (worker_process.py) and `--cluster` a cluster actor (cluster.py): then a crash, an
out-of-memory kill or a hung kernel in one worker never stops the server or the others. Each worker is watched by a
supervisor thread here, which is the only one talking to it (besides `cancel`) and does everything the worker
reports: it reads a job's inputs from the store and sends them, stores the O-Voxel and the outcome, and hands
progress and terminal messages to `emit` (the server's I/O thread delivers them).

Faults: a worker process that exits, or whose heartbeat stops for `hang_timeout_s`, or whose job makes no progress
for `step_timeout_s`, is killed and started again; each job it held goes back to the front of the queue for another
worker (its client is told it restarts) once, and fails with an error naming both failures the second time. A
killed worker cannot finish anything, and every outcome is recorded once (`JobStore.finish`), so no job runs twice
to completion. The server uses the pool only through the calls below (the same ones it used for its one worker).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Protocol

from backend.server import cluster
from backend.server.requests import JobSpec
from backend.server.store import JobStore, Terminal
from backend.server.worker import (EngineWorker, Event, EventQueue, Finished, Generated, Heartbeat, JobOrder, Loaded,
                                   MODEL_NOT_READY_HINT, LoadFailed, Loader, Loading, Ready, WorkerFacts, WorkerLost,
                                   failure_error)
from backend.server.worker_process import ProcessTransport, visible_gpus
from protocol import Cancelled, Error, ErrorCode, Message, ModelStatus, Progress, Schema, WorkerState, WorkerStatus
from protocol.settings import GENERATE, REPROCESS, SETTINGS, TEXTURE

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a supervisor looks at its worker's events, the queue and the clocks
MAX_RUNS = 2  # a job whose worker fails is run once more, on another worker where there is one
RESTART_BACKOFF_MAX_S = 30.0  # a worker that keeps dying before it loads is restarted at most this slowly


class Transport(Protocol):
    """One running worker as its supervisor sees it: commands in, events out."""

    killable: bool  # False for the embedded worker, whose faults cannot be contained
    start_timeout_s: float | None  # silence allowed before its first event; None: wait (a cluster placing it)

    def run(self, order: JobOrder) -> None: ...
    def cancel(self, job_id: str) -> None: ...
    def interrupt(self) -> None: ...
    def receive(self, timeout: float) -> list[Event]: ...  # raises WorkerLost
    def kill(self) -> None: ...
    def close(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class PoolConfig:
    """Who runs the jobs (the `serve` flags of the same names)."""

    gpus: str | None = None  # "all" or "0,1": a worker process per GPU
    workers: int | None = None  # N worker processes on the one device, or N cluster actors
    cluster: str | None = None  # a Ray address, or "local"
    overlap: bool = False  # a job's generation may start during the previous job's asset step
    hang_timeout_s: float = 10.0  # a worker process silent this long is killed and restarted
    step_timeout_s: float = 300.0  # so is one whose job makes no progress this long


@dataclass(frozen=True)
class WorkerPlan:
    """How to start one worker (again, after a fault)."""

    name: str
    device: str  # what it was given, shown until it reports its own
    launch: Callable[[], Transport]
    host: str = field(default_factory=socket.gethostname)


@dataclass
class QueuedJob:
    job_id: str
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    failures: list[str] = field(default_factory=list)  # "worker NAME REASON", one per worker lost with it

    def runs_on(self, worker: str) -> bool:
        return not any(f.startswith(f"worker {worker} ") for f in self.failures)


@dataclass
class _Slot:
    plan: WorkerPlan
    state: WorkerState = WorkerState.LOADING
    transport: Transport | None = None
    facts: WorkerFacts | None = None
    jobs: dict[str, QueuedJob] = field(default_factory=dict)
    offered: bool = False
    gpu_memory: tuple[int | None, int | None] = (None, None)
    restarts: int = 0
    error: str = ""
    interrupted: bool = False
    loading: tuple[str, float] = ("", 0.0)  # (what, fraction) while the worker loads
    last_heard: float = 0.0
    last_progress: float = 0.0
    thread: threading.Thread | None = None


class ThreadTransport:
    """The embedded worker of a plain `serve`: on threads of the server process, as before there were pools."""

    killable = False
    start_timeout_s = None

    def __init__(self, name: str, load: Loader, overlap: bool) -> None:
        self._events = EventQueue()
        self._worker = EngineWorker(name, load, self._events.put, overlap)
        self._worker.start()
        self.run, self.cancel, self.interrupt = self._worker.run, self._worker.cancel, self._worker.interrupt

    def receive(self, timeout: float) -> list[Event]:
        return self._events.drain(timeout)

    def kill(self) -> None:
        log.error("the embedded worker cannot be killed; run `serve --workers 1` to isolate it in a process")

    def close(self, timeout: float) -> None:
        self._worker.close(timeout)


class WorkerPool:
    """Thread-safe calls from the server's I/O thread: submit, cancel, queue_length, waiting, running, stop,
    interrupt, workers and the status properties. The server bounds the queue."""

    def __init__(self, store: JobStore, emit: Callable[[Message], None], plans: list[WorkerPlan],
                 hang_timeout_s: float = 10.0, step_timeout_s: float = 300.0,
                 on_close: Callable[[], None] | None = None) -> None:
        if not plans:
            raise ValueError("a worker pool needs at least one worker")
        self.store, self._emit, self._on_close = store, emit, on_close
        self.hang_timeout_s, self.step_timeout_s = hang_timeout_s, step_timeout_s
        self._slots = [_Slot(plan) for plan in plans]
        self._lock = threading.Lock()
        self._queue: deque[QueuedJob] = deque()
        self._stopping = threading.Event()
        self._closed = False
        self._started = False

    # -- status, for `info` and submit checks -----------------------------------------------------

    @property
    def status(self) -> ModelStatus:
        states = {slot.state for slot in self._slots}
        if not self._started:
            return ModelStatus.NOT_LOADED
        if states & {WorkerState.IDLE, WorkerState.BUSY}:
            return ModelStatus.READY
        return ModelStatus.FAILED if states == {WorkerState.FAILED} else ModelStatus.LOADING

    @property
    def load_error(self) -> str:
        failed = [slot for slot in self._slots if slot.state == WorkerState.FAILED]
        if len(self._slots) == 1:
            return failed[0].error if failed else ""
        return "; ".join(f"worker {slot.plan.name}: {slot.error}" for slot in failed)

    @property
    def device(self) -> str:
        devices = list(dict.fromkeys(self._device_of(slot) for slot in self._slots))
        return devices[0] if len(self._slots) == 1 else f"{len(self._slots)} workers: {', '.join(devices)}"

    @property
    def gpu_memory(self) -> tuple[int | None, int | None]:
        """Free and total bytes over every worker's GPU that reports figures."""
        figures = [slot.gpu_memory for slot in self._slots if slot.gpu_memory[1] is not None]
        if not figures:
            return None, None
        return sum(free or 0 for free, _ in figures), sum(total for _, total in figures)

    @property
    def schema(self) -> Schema:
        """The settings schema jobs are checked against: a loaded worker's (its checkpoint's defaults)."""
        facts = self._loaded_facts()
        return facts[0].schema if facts else SETTINGS

    @property
    def capabilities(self) -> tuple[str, ...]:
        facts = self._loaded_facts()
        return tuple(c for c in facts[0].capabilities if all(c in f.capabilities for f in facts)) if facts else ()

    @property
    def versions(self) -> dict[str, str | None]:
        """A loaded worker's library versions (torch, CUDA) for `info`."""
        facts = self._loaded_facts()
        return facts[0].versions if facts else {}

    def workers(self) -> list[WorkerStatus]:
        with self._lock:
            return [WorkerStatus(slot.plan.name, slot.plan.host if slot.facts is None else slot.facts.host,
                                 self._device_of(slot), slot.state, list(slot.jobs),
                                 list(slot.facts.models) if slot.facts else [], slot.restarts,
                                 slot.facts.pid if slot.facts else None, slot.error, *slot.loading)
                    for slot in self._slots]

    def _loaded_facts(self) -> list[WorkerFacts]:
        return [slot.facts for slot in self._slots if slot.facts is not None]

    @staticmethod
    def _device_of(slot: _Slot) -> str:
        return slot.facts.device if slot.facts is not None else slot.plan.device

    # -- jobs -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        for slot in self._slots:
            slot.thread = threading.Thread(target=self._supervise, args=(slot,), name=f"pool-{slot.plan.name}",
                                           daemon=True)
            slot.thread.start()

    def submit(self, job: QueuedJob) -> int:
        """Queue `job`; returns its queue position (0: a worker is free for it)."""
        with self._lock:
            self._queue.append(job)
            ahead = len(self._queue) - 1
            free = sum(slot.offered for slot in self._slots)
            return ahead if free > ahead else ahead + len(self._running())

    def cancel(self, job_id: str) -> str | None:
        """Where the job was: "queued" (removed, it never runs; the caller ends it), "running" (it stops at its
        next step), or None (no worker holds it)."""
        with self._lock:
            for job in self._queue:
                if job.job_id == job_id:
                    self._queue.remove(job)
                    return "queued"
            for slot in self._slots:
                if job_id in slot.jobs:
                    slot.jobs[job_id].cancel.set()
                    transport = slot.transport
                    break
            else:
                return None
        if transport is not None:
            transport.cancel(job_id)
        return "running"

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._running())

    def waiting(self) -> list[str]:
        with self._lock:
            return [job.job_id for job in self._queue]

    def running(self) -> list[str]:
        with self._lock:
            return self._running()

    def _running(self) -> list[str]:
        return [job_id for slot in self._slots for job_id in slot.jobs]

    def stop(self) -> None:
        """Take no further job; running ones go on (see `interrupt`). Queued jobs stay queued on disk."""
        self._stopping.set()

    def interrupt(self) -> None:
        """Stop the running jobs at their next step and leave them queued on disk, to run again after a restart."""
        self.stop()
        for slot in self._slots:
            slot.interrupted = True

    def is_alive(self) -> bool:
        return any(slot.thread is not None and slot.thread.is_alive() for slot in self._slots)

    def join(self, timeout: float | None = None) -> None:
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(timeout)

    def close(self) -> None:
        """Kill whatever is still running (the server is exiting); jobs not ended stay queued on disk."""
        self._closed = True
        self.stop()
        for slot in self._slots:
            transport = slot.transport
            if transport is not None and transport.killable:
                transport.kill()
        self.join(5.0)
        if self._on_close is not None:
            self._on_close()

    def _take(self, slot: _Slot) -> QueuedJob | None:
        """The first waiting job this worker may run: one that failed on it only when no other worker can."""
        with self._lock:
            others = any(s is not slot and s.state != WorkerState.FAILED for s in self._slots)
            for job in self._queue:
                if job.runs_on(slot.plan.name) or not others:
                    self._queue.remove(job)
                    slot.jobs[job.job_id] = job
                    slot.offered = False
                    slot.last_progress = time.monotonic()
                    return job
        return None

    # -- supervision ------------------------------------------------------------------------------

    def _supervise(self, slot: _Slot) -> None:
        """Start the worker, drive it, and start it again whenever it is lost, until the pool stops."""
        losses = 0
        while not self._stopping.is_set():
            if losses:
                delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** (losses - 1) - 1.0)  # 0 s first, then 1, 3, 7, ...
                if self._stopping.wait(delay):
                    break
            slot.state, slot.facts, slot.offered = WorkerState.LOADING, None, False
            try:
                transport = slot.plan.launch()
            except Exception as exc:  # e.g. the cluster refuses the actor
                log.exception("worker %s could not be started", slot.plan.name)
                self._lost(slot, f"could not be started ({type(exc).__name__}: {exc})")
                losses += 1
                continue
            slot.transport = transport
            try:
                ended = self._drive(slot, transport)
            except WorkerLost as exc:
                transport.kill()
                self._lost(slot, str(exc))
                losses = 1 if slot.facts is not None else losses + 1
                continue
            finally:
                slot.transport = None
            if ended == "failed":
                self._end_waiting_if_no_worker_loads()
                return
            break
        if slot.state != WorkerState.FAILED:
            slot.state = WorkerState.LOADING if slot.facts is None else WorkerState.IDLE
        log.info("worker %s stopped", slot.plan.name)

    def _drive(self, slot: _Slot, transport: Transport) -> str:
        """Relay one worker's events until the pool stops ("stopped") or its models fail ("failed"); raises
        WorkerLost when it dies or stops answering."""
        slot.last_heard = time.monotonic()
        heard = interrupted = False
        while True:
            if self._stopping.is_set() and (not slot.jobs or self._closed):
                transport.close(5.0)
                return "stopped"
            if slot.interrupted and not interrupted:
                transport.interrupt()
                interrupted = True
            events = transport.receive(POLL_S)
            now = time.monotonic()
            if events:
                slot.last_heard, heard = now, True
            for event in events:
                if self._handle(slot, event) == "failed":
                    transport.close(5.0)
                    return "failed"
            if transport.killable:
                self._check_alive(slot, transport, now, heard)
            if slot.offered and not self._stopping.is_set():
                self._dispatch(slot, transport)

    def _check_alive(self, slot: _Slot, transport: Transport, now: float, heard: bool) -> None:
        limit = self.hang_timeout_s if heard else transport.start_timeout_s
        silence = now - slot.last_heard
        if limit is not None and silence > limit:
            raise WorkerLost(f"stopped answering (nothing heard for {silence:.0f} s)")
        stalled = now - slot.last_progress
        if slot.jobs and stalled > self.step_timeout_s:
            raise WorkerLost(f"made no progress for {stalled:.0f} s in job {', '.join(slot.jobs)}")

    def _handle(self, slot: _Slot, event: Event) -> str | None:
        if isinstance(event, Progress):
            if event.job_id in slot.jobs:
                slot.last_progress = time.monotonic()
                self._emit(event)
        elif isinstance(event, Heartbeat):
            slot.gpu_memory = event.gpu_memory
        elif isinstance(event, Loading):
            slot.loading = loading_text(event), min(1.0, event.done / event.total) if event.total else 0.0
            with self._lock:
                waiting = list(self._queue)
            for job in waiting:  # jobs that wait for the models see why
                self._emit(Progress(job.job_id, "loading", 0, 0, 0.0, slot.loading[0]))
        elif isinstance(event, Ready):
            slot.offered = True
        elif isinstance(event, Generated):
            if event.job_id in slot.jobs:
                self.store.save_ovoxel(event.job_id, event.ovoxel)
        elif isinstance(event, Finished):
            with self._lock:
                job = slot.jobs.pop(event.job_id, None)
                slot.state = WorkerState.BUSY if slot.jobs else WorkerState.IDLE
            if job is not None and event.outcome is not None:
                self._finish(event.outcome, event.seconds)
        elif isinstance(event, Loaded):
            slot.facts, slot.state, slot.loading = event.facts, WorkerState.IDLE, ("", 0.0)
            log.info("worker %s ready on %s (%s, pid %d)", slot.plan.name, event.facts.device, event.facts.host,
                     event.facts.pid)
        elif isinstance(event, LoadFailed):
            slot.state, slot.error, slot.loading = WorkerState.FAILED, event.error, ("", 0.0)
            log.error("worker %s: loading the models failed: %s", slot.plan.name, event.error)
            return "failed"
        return None

    def _dispatch(self, slot: _Slot, transport: Transport) -> None:
        job = self._take(slot)
        if job is None:
            return
        slot.state = WorkerState.BUSY
        try:
            order = self._order(job)
        except Exception as exc:  # its inputs are gone (a purged source O-Voxel, a damaged store)
            with self._lock:
                slot.jobs.pop(job.job_id, None)
                slot.offered = True
                slot.state = WorkerState.BUSY if slot.jobs else WorkerState.IDLE
            self._finish(failure_error(job.job_id, exc), 0.0)
            return
        log.info("job %s goes to worker %s", job.job_id, slot.plan.name)
        transport.run(order)

    def _order(self, job: QueuedJob) -> JobOrder:
        spec, job_id = job.spec, job.job_id
        mesh = self.store.load_mesh(job_id) if self.store.has_mesh(job_id) else None
        if spec.kind == REPROCESS:
            self.store.share_ovoxel(spec.source_job_id, job_id)
            mesh = self.store.load_mesh(job_id) if self.store.has_mesh(job_id) else None
            return JobOrder(job_id, spec, ovoxel=self.store.load_ovoxel(job_id), mesh=mesh)
        if spec.kind in (GENERATE, TEXTURE) and self.store.has_ovoxel(job_id):  # made before a restart: build only
            return JobOrder(job_id, spec, ovoxel=self.store.load_ovoxel(job_id), mesh=mesh)
        return JobOrder(job_id, spec, image=self.store.image(job_id), mesh=mesh)

    def _lost(self, slot: _Slot, reason: str) -> None:
        """The worker is gone: give its jobs another run (or their final error) and mark it for a restart."""
        with self._lock:
            jobs, slot.jobs = list(slot.jobs.values()), {}
            slot.offered, slot.state, slot.error = False, WorkerState.RESTARTING, reason
            slot.restarts += 1
        where = f"worker {slot.plan.name} {reason}"
        log.error("%s; %d job(s) it held: %s", where, len(jobs), ", ".join(j.job_id for j in jobs) or "none")
        for job in jobs:
            job.failures.append(where)
            if self._stopping.is_set():
                log.info("job %s stays queued on disk (the server is stopping)", job.job_id)
            elif job.cancel.is_set():
                self._finish(Cancelled(job.job_id), 0.0)
            elif len(job.failures) >= MAX_RUNS:
                self._finish(Error(ErrorCode.INTERNAL_ERROR, f"the job's worker failed {len(job.failures)} times: "
                                   f"{'; then '.join(job.failures)}",
                                   "the job may be too large for this server: try fewer faces, a smaller "
                                   "texture_size or a smaller pipeline_type; the server log has details",
                                   job.job_id), 0.0)
            else:
                with self._lock:
                    self._queue.appendleft(job)
                log.info("job %s re-queued after its worker was lost", job.job_id)
                self._emit(Progress(job.job_id, "queued", 0, 0, 0.0,
                                    f"restarting: {where}; the job starts again on another worker"))

    def _end_waiting_if_no_worker_loads(self) -> None:
        """Once every worker has failed to load its models, no waiting job can ever run: end them all with
        model_not_ready instead of leaving their clients waiting for ever."""
        if self.status != ModelStatus.FAILED:
            return
        with self._lock:
            jobs, self._queue = list(self._queue), deque()
        for job in jobs:
            self._finish(Error(ErrorCode.MODEL_NOT_READY, f"the models failed to load: {self.load_error[:2000]}",
                               MODEL_NOT_READY_HINT, job.job_id), 0.0)

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


def build_pool(config: PoolConfig, store: JobStore, emit: Callable[[Message], None], load: Loader,
               device: str | None) -> WorkerPool:
    """The pool `serve` asked for: the embedded worker, worker processes (per GPU or N on `device`) or cluster
    actors. Raises ValueError naming a conflicting or impossible choice."""
    if config.workers is not None and config.workers < 1:
        raise ValueError(f"--workers {config.workers}: give at least 1")
    if config.hang_timeout_s <= 0 or config.step_timeout_s <= 0:
        raise ValueError("--hang-timeout and --step-timeout must be positive")
    on_close = None
    if config.cluster is not None:
        if config.gpus is not None:
            raise ValueError("--gpus is for one machine; on a cluster Ray gives each worker a GPU (use --workers N "
                             "to run fewer than the cluster has)")
        cluster.connect(config.cluster, config.workers)
        on_close = cluster.disconnect
        on_gpu = device != "cpu"
        count = config.workers or (cluster.gpu_count() if on_gpu else 0)
        if count == 0:
            cluster.disconnect()
            raise ValueError(f"the cluster at {config.cluster} has no GPUs; join GPU machines with `ray start "
                             f"--address`, or give --device cpu --workers N to run on its CPUs")
        plans = [WorkerPlan(f"ray{i}", device or "cuda", partial(cluster.RayTransport, f"ray{i}", load, config.overlap,
                                                               on_gpu), "cluster") for i in range(count)]
    elif config.gpus is not None:
        if config.workers is not None or device is not None:
            raise ValueError("--gpus gives each GPU its own worker: leave out --workers and --device")
        plans = [WorkerPlan(f"gpu{gpu}", f"cuda (GPU {gpu})",
                            partial(ProcessTransport, f"gpu{gpu}", load, config.overlap, gpu))
                 for gpu in visible_gpus(config.gpus)]
    elif config.workers is not None:
        plans = [WorkerPlan(f"w{i}", device or "auto", partial(ProcessTransport, f"w{i}", load, config.overlap, None))
                 for i in range(config.workers)]
    else:
        plans = [WorkerPlan("main", device or "auto", partial(ThreadTransport, "main", load, config.overlap))]
    return WorkerPool(store, emit, plans, config.hang_timeout_s, config.step_timeout_s, on_close)


def loading_text(event: Loading) -> str:
    """A loading report for people: "downloading NAME: 1.2 of 2.6 GB (46%)", "loading models: 3 of 9 (NAME)"."""
    if event.phase == "downloading":
        of = f" of {event.total / 2**30:.1f} GB ({100 * event.done / event.total:.0f}%)" if event.total else ""
        return f"downloading {event.item}: {event.done / 2**30:.1f}{'' if of else ' GB'}{of}"
    return f"loading models: {event.done} of {event.total}" + (f" ({event.item})" if event.item else "")
