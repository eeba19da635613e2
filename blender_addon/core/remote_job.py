"""One job on the backend (a generate, reprocess or texture request, or a re-import of a stored result) and what the
user sees of it.

The work (connecting, maybe starting the local backend, submitting, waiting, checking and converting the result)
runs either in a worker thread, which hands its events to the main thread through a queue (`start` + `drain`, for
Blender's UI, which must never block), or right on the calling thread (`run_here`, for `blender -b`, where timers
never fire). Either way the events are handled by the same code on the thread that owns the RemoteJob, so its state
is only ever touched there. The worker owns its own protocol Client (zmq sockets must stay on one thread).
Cancel is sent to the server, which stops the job at its next step. The job's `read_result` checks and converts
its Result on the worker thread (a generated asset's MeshData by default; core/texturing.py reads texture results).
A backend that restarts, or a connection made anew, is followed through by the Client (it fetches the job again; its
Notice shows on the progress line); a backend silent for longer than the connection's resume window ends the job
with a clear error, so no wait is endless.
"""

from __future__ import annotations

import queue
import threading
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..protocol import Accepted, Cancelled, Client, Error, Message, Notice, Progress, ProtocolError, Request, Result
from .connection import Say
from .errors import AddonError, user_error
from .result import MeshData, mesh_data

Connect = Callable[[Say], Client]  # opens a Client (starting the local backend if that is the set-up)
ReadResult = Callable[[Result], Any]  # a Result checked and converted (AddonError if it breaks the contract)
POLL_MS = 100  # how long the worker waits for a message before looking at the cancel flag again

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclass
class JobStatus:
    """What the progress bar shows."""

    stage: str = "connecting"
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    message: str = ""

    def text(self) -> str:
        steps = f" {self.step}/{self.total}" if self.total else ""
        return f"{self.stage.replace('_', ' ')}{steps}" + (f": {self.message}" if self.message else "")


def read_asset(result: Result) -> MeshData:
    """A generated asset's Result (generate, reprocess, re-import) as the mesh Blender builds."""
    return mesh_data(result.mesh, result.textures, result.metadata)


@dataclass(frozen=True)
class Finished:
    """The worker's last event of a job that ended with a result: what `read_result` made of it."""

    outcome: Any


class RemoteJob:
    def __init__(self, label: str, connect: Connect, *, request: Request | None = None,
                 fetch_job_id: str | None = None, read_result: ReadResult = read_asset,
                 on_event: Callable[[RemoteJob], None] | None = None) -> None:
        """Submit `request`, or (with `fetch_job_id`) collect a finished job's result again.
        `on_event(job)` runs on the owning thread after every handled event (progress printing, redraws)."""
        if (request is None) == (fetch_job_id is None):
            raise ValueError("a RemoteJob submits a request or fetches a job id, exactly one of them")
        self.label = label
        self._connect, self._request, self._fetch_job_id, self._on_event = connect, request, fetch_job_id, on_event
        self._read_result = read_result
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self.state = RUNNING
        self.status = JobStatus()
        self.job_id: str | None = fetch_job_id
        self.outcome: Any = None  # what read_result made of the Result, once DONE
        self.error: AddonError | None = None

    # -- owner's side --------------------------------------------------------------------------

    def start(self) -> None:
        """Work in a daemon thread; call drain() regularly from the owning thread."""
        threading.Thread(target=self._work, args=(self._events.put,), name=f"trellis2 {self.label}",
                         daemon=True).start()

    def drain(self) -> bool:
        """Handle the events that arrived since the last call; True if anything changed."""
        changed = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return changed
            self._handle(event)
            changed = True

    def run_here(self) -> None:
        """Do all the work on this thread and return when the job has ended."""
        self._work(self._handle)

    def cancel(self) -> None:
        """Ask the server to cancel (the job then ends as cancelled, or with its result if it was too late)."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def _handle(self, event: Message | Finished | AddonError | str) -> None:
        if isinstance(event, str):
            self.status = JobStatus(event, fraction=self.status.fraction)
        elif isinstance(event, Accepted):
            self.job_id = event.job_id
            self.status = JobStatus("queued" if event.queue_position else "starting",
                                    message=f"{event.queue_position} job(s) ahead" if event.queue_position else "")
        elif isinstance(event, Progress):
            self.status = JobStatus(event.stage, event.step, event.total, event.fraction, event.message)
        elif isinstance(event, Notice):  # the backend was lost or restarted: the job goes on, say so
            self.status = replace(self.status, message=event.text)
        elif isinstance(event, Finished):
            self.outcome, self.state = event.outcome, DONE
            self.status = JobStatus("done", fraction=1.0)
        elif isinstance(event, Cancelled):
            self.state, self.status = CANCELLED, JobStatus("cancelled")
        elif isinstance(event, AddonError):
            self.error, self.state, self.status = event, FAILED, JobStatus("failed")
        if self._on_event is not None:
            self._on_event(self)

    # -- worker's side: touches only its Client, the cancel flag and `emit` --------------------

    def _work(self, emit: Callable[[Any], None]) -> None:
        try:
            with self._connect(emit) as client:
                emit("connecting")
                client.hello()
                if self._fetch_job_id is not None:
                    emit("fetching")
                    self._finish(client.fetch(self._fetch_job_id), emit)
                else:
                    self._finish(self._follow(client, client.submit(self._request), emit), emit)
        except Exception as exc:
            emit(user_error(exc))

    def _follow(self, client: Client, job_id: str, emit: Callable[[Any], None]) -> Message:
        """Pass the job's events on and return its terminal message. Cancel on the server when asked, and also
        when this wait is interrupted (Ctrl-C in a batch run), so no orphan job keeps the GPU busy."""
        cancel_sent = False
        try:
            while True:
                if self._cancel.is_set() and not cancel_sent:
                    client.cancel(job_id)
                    cancel_sent = True
                msg = client.poll_event(POLL_MS)
                if msg is None or getattr(msg, "job_id", None) != job_id:
                    continue
                if msg.TERMINAL:
                    return msg
                emit(msg)
        except BaseException:
            with suppress(ProtocolError):
                client.cancel(job_id)
            raise

    def _finish(self, msg: Message, emit: Callable[[Any], None]) -> None:
        if isinstance(msg, Result):
            emit("reading result")
            emit(Finished(self._read_result(msg)))
        elif isinstance(msg, Error):
            emit(user_error(msg.to_exception()))
        else:
            emit(msg)  # Cancelled
