"""The add-on's session, free of bpy: the local backend process, the status monitor, the running job and where its
outcome goes (a new object, or the surface of an existing one), and the last outcome shown in the panel.
`blender/timer.py` drives it from Blender's main thread.

Where the backend is comes from the preferences as a `BackendPlan`, read on the main thread (bpy must not be used
from other threads); everything that connects or waits takes the plan, so it runs on any thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .connection import Connection, Say
from .errors import user_error
from .local_backend import LocalBackend
from .remote_job import Connect, RemoteJob
from .status import CONNECTING, NOT_STARTED, BackendStatus, StatusMonitor

LOCAL, REMOTE = "LOCAL", "REMOTE"


@dataclass(frozen=True)
class BackendPlan:
    """Where the backend is, as the preferences say: a remote server, or a local one this session starts."""

    mode: str  # LOCAL or REMOTE
    remote: Connection | None = None
    python: str = ""  # the local backend's interpreter
    weights: str = ""
    home: Path | None = None  # the local backend's log and job store


@dataclass(frozen=True)
class Target:
    """Where a job's object goes and what is remembered about it; captured when the job starts."""

    label: str
    scene: str
    location: tuple[float, float, float]
    settings: dict[str, Any] = field(default_factory=dict)  # flat settings, kept with the recent result
    remember: bool = True  # False for a re-import, which is already among the recent results


@dataclass(frozen=True, eq=False)  # eq=False: an array field has no truth value
class SurfaceTarget:
    """The existing object a texture job paints, and its UV map the textures were baked into; captured when the
    job starts. A UV map the add-on made for the job is only written when the textures arrive (one undo step,
    nothing left behind by a failed or cancelled job): `new_uvs` holds it per corner of the object's own mesh."""

    label: str  # the object's name
    uv_map: str  # the UV map whose UVs were sent
    new_uvs: np.ndarray | None = None  # float32 [corners, 2] of the base mesh: the UV map to make; None: it exists


class Session:
    def __init__(self) -> None:
        self.backend = LocalBackend()
        self.monitor: StatusMonitor | None = None
        self.job: RemoteJob | None = None
        self.target: Target | SurfaceTarget | None = None
        self.message: tuple[str, str] | None = None  # (level, text) of the last outcome, shown in the panel
        self.shown_status: BackendStatus | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.done

    def connector(self, plan: BackendPlan) -> Connect:
        """The job worker's connect function: the remote server, or the local backend started when needed."""
        if plan.mode == REMOTE:
            return lambda say: plan.remote.client()
        return lambda say: Connection.local(self.start_local(plan, say)).client()

    def start_local(self, plan: BackendPlan, say: Say) -> str:
        """Start the local backend unless it runs already; its address. Callable from any thread."""
        return self.backend.ensure_running(plan.python, plan.weights, plan.home, say)

    def start_local_in_background(self, plan: BackendPlan) -> None:
        """Start the local backend in a thread (it can take a while); a failure shows in the panel."""
        def work() -> None:
            try:
                self.start_local(plan, lambda text: None)
            except Exception as exc:
                self.message = ("ERROR", str(user_error(exc)))

        threading.Thread(target=work, name="trellis2 backend start", daemon=True).start()

    def monitored_connection(self, plan: BackendPlan) -> Connection | None:
        """Where the status line asks: the remote server, the local backend once it answered, else nowhere."""
        if plan.mode == REMOTE:
            return plan.remote
        return Connection.local(self.backend.address) if self.backend.running and self.backend.ready else None

    def status(self, plan: BackendPlan) -> BackendStatus:
        if plan.mode == LOCAL and self.backend.running and not self.backend.ready:
            return BackendStatus("connecting", "starting the local backend")
        if self.monitor is None:
            return NOT_STARTED if plan.mode == LOCAL and not self.backend.running else CONNECTING
        return self.monitor.snapshot()

    def watch(self, plan: BackendPlan) -> None:
        """Point the status monitor at the backend (starting the monitor on first use)."""
        if self.monitor is None:
            self.monitor = StatusMonitor()
            self.monitor.start()
        self.monitor.watch(self.monitored_connection(plan))

    def shutdown(self) -> None:
        if self.job is not None:
            self.job.cancel()
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        self.backend.stop()


def progress_printer() -> Callable[[RemoteJob], None]:
    """An `on_event` for jobs run under `blender -b`: prints a progress line whenever the stage or step changes."""
    last = ""

    def show(job: RemoteJob) -> None:
        nonlocal last
        line = f"TRELLIS.2 {job.label}: {job.status.text()} ({job.status.fraction:.0%})"
        if line != last:
            print(line, flush=True)
            last = line

    return show
