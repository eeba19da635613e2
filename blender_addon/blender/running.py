"""Running a job for an operator and putting its outcome into the scene: a new object (generate, reprocess,
re-import: a `Target`) or the material on an existing one (texture: a `SurfaceTarget`, blender/texturing.py).

In the UI a job runs in a worker thread (`launch` starts it; the timer, `timer.py`, drains its events and calls
`complete` when it ends); under `blender -b` timers never fire, so `launch` runs the job on the calling thread and
builds the object before the operator returns. The add-on's one `session` (core/session.py) lives here.
"""

from __future__ import annotations

from typing import Any

import bpy

from ..core.remote_job import CANCELLED, DONE, RemoteJob
from ..core.result import MeshData
from ..core.session import Session, SurfaceTarget, Target
from .build import build_object
from .properties import remember
from .texturing import paint

session = Session()


def target_here(context: bpy.types.Context, label: str, settings: dict[str, Any], remember_it: bool = True) -> Target:
    return Target(label, context.scene.name, tuple(context.scene.cursor.location), dict(settings), remember_it)


def complete(job: RemoteJob, target: Target | SurfaceTarget) -> bpy.types.Object | None:
    """On the main thread, after the job ended: its object (built, selected, remembered; or textured), None if it
    was cancelled; raises the job's AddonError if it failed (or, when the local backend died, what its log says)."""
    if job.state == CANCELLED:
        return None
    if job.state != DONE:
        raise session.backend.exit_error() or job.error
    if isinstance(target, SurfaceTarget):
        obj = paint(target, job.outcome)
    else:
        obj = build_new(job, target)
    obj["trellis2_job"] = job.job_id
    return obj


def build_new(job: RemoteJob, target: Target) -> bpy.types.Object:
    scene = bpy.data.scenes.get(target.scene) or bpy.context.scene
    view_layer = bpy.context.view_layer if bpy.context.scene == scene else scene.view_layers[0]
    obj = build_object(target.label, job.outcome, view_layer=view_layer,
                       collection=view_layer.active_layer_collection.collection, location=target.location)
    if target.remember:
        remember(scene.trellis2, target.label, job.job_id, target.settings)
    return obj


def summary(job: RemoteJob, obj: bpy.types.Object) -> str:
    """What a finished job did, for reports and the panel."""
    if isinstance(job.outcome, MeshData):
        return f"built {obj.name} ({job.outcome.face_count} faces)"
    texture = job.outcome.material.base_color
    return f"textured {obj.name} ({texture.width}x{texture.height} textures)"


def launch(op: bpy.types.Operator, job: RemoteJob, target: Target | SurfaceTarget) -> set[str]:
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
    op.report({"INFO"}, f"TRELLIS.2: {summary(job, obj)}")
    return {"FINISHED"}
