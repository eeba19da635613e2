"""The add-on's session: the local backend process, the status monitor, the running job, and the main-thread timer
that connects them to Blender.

In the UI a job runs in a worker thread; `tick` (a persistent `bpy.app.timers` callback) drains its events, redraws
the panel, and builds the object when the result is in, as one undo step. Under `blender -b` timers never fire, so
`launch` runs the job on the calling thread instead and builds the object before the operator returns.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import bpy

from ..core.backend import Connection, LocalBackend, Say
from ..core.errors import AddonError, user_error
from ..core.jobs import CANCELLED, DONE, Connect, Job
from ..core.status import CONNECTING, NOT_STARTED, BackendStatus, StatusMonitor
from .build import build_object
from .preferences import Trellis2Preferences, preferences
from .properties import remember, settings_of

log = logging.getLogger(__name__)

CATEGORY = "TRELLIS.2"  # the sidebar tab
TICK_BUSY_S, TICK_IDLE_S = 0.1, 0.5


@dataclass(frozen=True)
class Target:
    """Where a job's object goes and what is remembered about it; captured when the job starts."""

    label: str
    scene: str
    location: tuple[float, float, float]
    settings: dict[str, Any] = field(default_factory=dict)  # flat settings, kept with the recent result
    remember: bool = True  # False for a re-import, which is already among the recent results


class Session:
    def __init__(self) -> None:
        self.backend = LocalBackend()
        self.monitor: StatusMonitor | None = None
        self.job: Job | None = None
        self.target: Target | None = None
        self.message: tuple[str, str] | None = None  # (level, text) of the last outcome, shown in the panel
        self.shown_status: BackendStatus | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.done

    def shutdown(self) -> None:
        if self.job is not None:
            self.job.cancel()
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        self.backend.stop()


session = Session()


def connector(prefs: Trellis2Preferences) -> Connect:
    """The worker's connect function, with everything it needs read from the preferences here on the main thread."""
    if prefs.backend_mode == "REMOTE":
        connection = prefs.remote_connection()
        if not (bpy.app.online_access or connection.address.startswith(("tcp://127.", "tcp://localhost", "ipc://"))):
            raise AddonError("Online access is disabled, so the add-on may not reach a remote server",
                             "Enable Preferences > System > Network > Allow Online Access.")
        return lambda say: connection.client()
    start = local_starter(prefs)
    return lambda say: Connection(start(say)).client()


def local_starter(prefs: Trellis2Preferences) -> Callable[[Say], str]:
    """Starts the local backend if needed and returns its address; callable from any thread."""
    python, weights = bpy.path.abspath(prefs.backend_python), bpy.path.abspath(prefs.weights)  # "//" paths
    home = prefs.local_backend_home()
    return lambda say: session.backend.ensure_running(python, weights, home, say)


def start_backend(prefs: Trellis2Preferences) -> None:
    """Start the local backend in a thread (it can take a while); a failure shows in the panel."""
    start = local_starter(prefs)

    def work() -> None:
        try:
            start(lambda text: None)
        except Exception as exc:
            session.message = ("ERROR", str(user_error(exc)))

    threading.Thread(target=work, name="trellis2 backend start", daemon=True).start()


def monitored_connection(prefs: Trellis2Preferences) -> Connection | None:
    """Where the status line asks: the remote server, the local backend once it answered, else nowhere."""
    if prefs.backend_mode == "REMOTE":
        return prefs.remote_connection()
    backend = session.backend
    return Connection(backend.address) if backend.running and backend.ready else None


def backend_status(prefs: Trellis2Preferences) -> BackendStatus:
    backend = session.backend
    if prefs.backend_mode == "LOCAL" and backend.running and not backend.ready:
        return BackendStatus("connecting", "starting the local backend")
    if session.monitor is None:
        return NOT_STARTED if prefs.backend_mode == "LOCAL" and not backend.running else CONNECTING
    return session.monitor.snapshot()


def target_here(context: bpy.types.Context, label: str, settings: dict[str, Any], remember_it: bool = True) -> Target:
    return Target(label, context.scene.name, tuple(context.scene.cursor.location), dict(settings), remember_it)


def complete(job: Job, target: Target) -> bpy.types.Object | None:
    """On the main thread, after the job ended: its object (built, selected, remembered), None if it was cancelled;
    raises the job's AddonError if it failed (or, when the local backend died, what its log says)."""
    if job.state == CANCELLED:
        return None
    if job.state != DONE:
        raise session.backend.exit_error() or job.error
    scene = bpy.data.scenes.get(target.scene) or bpy.context.scene
    view_layer = bpy.context.view_layer if bpy.context.scene == scene else scene.view_layers[0]
    obj = build_object(target.label, job.mesh, view_layer=view_layer,
                       collection=view_layer.active_layer_collection.collection, location=target.location)
    obj["trellis2_job"] = job.job_id
    if target.remember:
        remember(scene.trellis2, target.label, job.job_id, target.settings)
    return obj


def launch(op: bpy.types.Operator, job: Job, target: Target) -> set[str]:
    """Run `job` for operator `op`: in the background in the UI, to the end right here under `blender -b` (where a
    failure raises the job's AddonError, which the operator reports)."""
    if not bpy.app.background:
        session.job, session.target, session.message = job, target, None
        job.start()
        op.report({"INFO"}, f"TRELLIS.2: started {target.label}")
        return {"FINISHED"}
    job.run_here()
    obj = complete(job, target)
    if obj is None:
        op.report({"WARNING"}, f"TRELLIS.2: {target.label} was cancelled")
        return {"CANCELLED"}
    op.report({"INFO"}, f"TRELLIS.2: built {obj.name} ({job.mesh.face_count} faces)")
    return {"FINISHED"}


def progress_printer() -> Callable[[Job], None]:
    """An `on_event` for jobs run under `blender -b`: prints a progress line whenever the stage or step changes."""
    last = ""

    def show(job: Job) -> None:
        nonlocal last
        line = f"TRELLIS.2 {job.label}: {job.status.text()} ({job.status.fraction:.0%})"
        if line != last:
            print(line, flush=True)
            last = line

    return show


def _finish_in_ui(job: Job, target: Target) -> None:
    """Build the finished job's object as one undo step and report the outcome in the status bar and the panel.
    Outside any operator (this runs in the timer), so undo push and report go through a window's context."""
    obj = None
    try:
        obj = complete(job, target)
        session.message = ("INFO", f"built {obj.name}" if obj else f"{target.label} was cancelled")
    except Exception as exc:
        session.message = ("ERROR", str(user_error(exc)))
    window = next(iter(bpy.context.window_manager.windows), None)
    if window is None:
        return
    with bpy.context.temp_override(window=window):
        if obj is not None:
            bpy.ops.ed.undo_push(message=f"TRELLIS.2: {obj.name}")
        level, text = session.message
        bpy.ops.trellis2.report(level=level, message=f"TRELLIS.2: {text}")


def _redraw() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


def load_defaults_where_shown() -> None:
    """Give a scene the preferences' default settings when our sidebar tab is first shown for it (doing it for
    every scene at load would mark untouched files as modified)."""
    for window in bpy.context.window_manager.windows:
        state = window.scene.trellis2
        if state.defaults_loaded:
            continue
        for area in window.screen.areas:
            if area.type == "VIEW_3D" and any(r.type == "UI" and r.active_panel_category == CATEGORY
                                              for r in area.regions):
                load_defaults(state, preferences())
                break


def load_defaults(state: Any, prefs: Trellis2Preferences) -> None:
    for name, value in settings_of(prefs.defaults).items():
        setattr(state.settings, name, value)
    state.defaults_loaded = True


def tick() -> float:
    """The persistent main-thread timer. Never raises: an exception would unregister it."""
    try:
        changed = False
        job = session.job
        if job is not None and job.drain():
            changed = True
            if job.done:
                target, session.job, session.target = session.target, None, None
                _finish_in_ui(job, target)
        prefs = preferences()
        monitor = session.monitor or StatusMonitor()
        monitor.watch(monitored_connection(prefs))
        if session.monitor is None:
            session.monitor = monitor
            monitor.start()
        status = backend_status(prefs)
        if changed or status != session.shown_status:
            session.shown_status = status
            _redraw()
        load_defaults_where_shown()
    except Exception as exc:
        log.error("TRELLIS.2 timer: %s", user_error(exc))
    return TICK_BUSY_S if session.busy else TICK_IDLE_S


def register() -> None:
    atexit.register(session.shutdown)  # Blender does not unregister add-ons when it quits
    if not bpy.app.background:  # timers never fire there; jobs then run on the operator's thread
        bpy.app.timers.register(tick, first_interval=TICK_IDLE_S, persistent=True)


def unregister() -> None:
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    atexit.unregister(session.shutdown)
    session.shutdown()
