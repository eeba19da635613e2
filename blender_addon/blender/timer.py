"""The persistent main-thread timer that connects the session to Blender: it drains the running job's events, builds
the finished job's object as one undo step, keeps the status line and the server's extra settings fresh, and redraws
the panel. Timers never fire under `blender -b`, so it is registered only in the UI.
"""

from __future__ import annotations

import atexit
import logging

import bpy

from ..core.errors import user_error
from ..core.remote_job import RemoteJob
from ..core.session import SurfaceTarget, Target
from ..core.settings import unknown_settings
from ..protocol import Schema
from ..protocol.settings import GENERATE
from .preferences import preferences
from .properties import set_settings, settings_of, sync_extra_settings
from .running import complete, session, summary

log = logging.getLogger(__name__)

CATEGORY = "TRELLIS.2"  # the sidebar tab
TICK_BUSY_S, TICK_IDLE_S = 0.1, 0.5


def _finish_in_ui(job: RemoteJob, target: Target | SurfaceTarget) -> None:
    """Build (or texture) the finished job's object as one undo step and report the outcome in the status bar and
    the panel. Outside any operator (this runs in the timer), so undo push and report go through a window's
    context."""
    obj = None
    try:
        obj = complete(job, target)
        session.message = ("INFO", summary(job, obj) if obj else f"{target.label} was cancelled")
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


def load_defaults(state, prefs) -> None:
    set_settings(state.settings, settings_of(prefs.defaults))
    state.defaults_loaded = True


def _load_defaults_where_shown() -> None:
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


def _sync_server_settings(info) -> bool:
    """Offer the connected server's settings that this add-on does not know, in every open scene."""
    if info is None or not info.settings:
        return False
    try:
        unknown = unknown_settings(Schema.from_wire(info.settings), GENERATE)
    except Exception as exc:  # an unreadable schema must not stop the timer; the panel simply shows no extras
        log.warning("TRELLIS.2: the server's settings schema is unreadable: %s", user_error(exc))
        return False
    changed = False
    for window in bpy.context.window_manager.windows:
        changed |= sync_extra_settings(window.scene.trellis2, unknown)
    return changed


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
        plan = preferences().backend_plan()
        session.watch(plan)
        status = session.status(plan)
        if changed or status != session.shown_status:
            changed |= _sync_server_settings(status.info)
            session.shown_status = status
            _redraw()
        _load_defaults_where_shown()
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
