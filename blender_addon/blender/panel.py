"""The TRELLIS.2 tab of the 3D viewport's sidebar: backend status, image with preview, settings, Generate with a
live progress bar and Cancel, Texture Selected (the active mesh object textured from the same image, with the
texturing settings), and the recent results (re-import, re-process with the current asset settings)."""

from __future__ import annotations

from pathlib import Path

import bpy
import bpy.utils.previews

from ..core.remote_job import RemoteJob
from ..core.session import LOCAL
from ..core.settings import FIELDS, request_fields
from ..protocol.settings import TEXTURE
from .drawing import draw_advanced, draw_asset, draw_main
from .preferences import Trellis2Preferences, preferences
from .running import session
from .timer import CATEGORY

STATUS_ICONS = {"connected": "CHECKMARK", "connecting": "SORTTIME", "unreachable": "ERROR", "not_started": "BLANK1"}
_previews: bpy.utils.previews.ImagePreviewCollection | None = None


def file_preview_icon(path: str) -> int:
    """Icon id of a preview of an image file (loaded once per path; no image datablock is created)."""
    full = bpy.path.abspath(path)
    if _previews is None or not Path(full).is_file():
        return 0
    preview = _previews.get(full) or _previews.load(full, full, "IMAGE")
    return preview.icon_id


class SidebarPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = CATEGORY


class TRELLIS2_PT_main(SidebarPanel, bpy.types.Panel):
    bl_idname = "TRELLIS2_PT_main"
    bl_label = "TRELLIS.2"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        state = context.scene.trellis2
        draw_status(layout, preferences(context))
        draw_image(layout, state)
        draw_main(layout.column(), state.settings, seed_button=True)
        job = session.job
        if job is not None and not job.done:
            draw_progress(layout, job)
        else:
            draw_job_button(layout, state, "trellis2.generate", "MESH_MONKEY", FIELDS)
        if session.message is not None:
            level, text = session.message
            box = layout.box().column(align=True)
            for i, line in enumerate(text.split(". ", 1)):  # what happened, then what to do
                box.label(text=line, icon=("ERROR" if level == "ERROR" else "INFO") if i == 0 else "BLANK1")


def draw_status(layout: bpy.types.UILayout, prefs: Trellis2Preferences) -> None:
    status = session.status(prefs.backend_plan())
    row = layout.row(align=True)
    where = "Local" if prefs.backend_mode == LOCAL else prefs.server_address
    row.label(text=f"{where}: {status.text}", icon=STATUS_ICONS.get(status.state, "QUESTION"))
    if prefs.backend_mode == LOCAL:
        if session.backend.running:
            row.operator("trellis2.stop_backend", text="", icon="PAUSE")
        else:
            row.operator("trellis2.start_backend", text="", icon="PLAY")


def draw_image(layout: bpy.types.UILayout, state) -> None:
    col = layout.column()
    col.row().prop(state, "image_source", expand=True)
    if state.image_source == "IMAGE":
        col.template_ID_preview(state, "image", open="image.open", rows=3, cols=6)
        return
    col.prop(state, "image_path", text="")
    icon = file_preview_icon(state.image_path) if state.image_path else 0
    if icon:
        col.template_icon(icon_value=icon, scale=6.0)


def draw_job_button(layout: bpy.types.UILayout, state, idname: str, icon: str, fields, ready: bool = True):
    """A big button for operator `idname`, carrying the panel's image and its `fields` of the settings; enabled
    while an image is chosen and `ready`."""
    row = layout.row()
    row.scale_y = 1.5
    op = row.operator(idname, icon=icon)
    for name in fields:
        setattr(op, name, getattr(state.settings, name))
    if state.image_source == "FILE":
        op.image_path = state.image_path
    elif state.image is not None:
        op.image_name = state.image.name
    row.enabled = ready and bool(op.image_path or op.image_name)
    return op


def draw_progress(layout: bpy.types.UILayout, job: RemoteJob) -> None:
    row = layout.row(align=True)
    row.progress(factor=job.status.fraction, type="BAR", text=f"{job.label}: {job.status.text()}")
    row.operator("trellis2.cancel", text="", icon="CANCEL")


class TRELLIS2_PT_asset(SidebarPanel, bpy.types.Panel):
    bl_idname = "TRELLIS2_PT_asset"
    bl_label = "Asset"
    bl_parent_id = "TRELLIS2_PT_main"

    def draw(self, context: bpy.types.Context) -> None:
        self.layout.use_property_split = True
        draw_asset(self.layout, context.scene.trellis2.settings)


class TRELLIS2_PT_advanced(SidebarPanel, bpy.types.Panel):
    bl_idname = "TRELLIS2_PT_advanced"
    bl_label = "Advanced"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        self.layout.use_property_split = True
        state = context.scene.trellis2
        draw_advanced(self.layout, state.settings, state.extras)
        self.layout.operator("trellis2.load_defaults", icon="LOOP_BACK")


class TRELLIS2_PT_texture(SidebarPanel, bpy.types.Panel):
    bl_idname = "TRELLIS2_PT_texture"
    bl_label = "Texture Selected"
    bl_parent_id = "TRELLIS2_PT_main"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        state = context.scene.trellis2
        obj = context.view_layer.objects.active if context.view_layer else None
        is_mesh = obj is not None and obj.type == "MESH"
        col = layout.column(align=True)
        if is_mesh:
            col.label(text=obj.name, icon="OUTLINER_OB_MESH")
        else:
            col.label(text="Select a mesh object", icon="ERROR")
        image = Path(bpy.path.abspath(state.image_path)).name if state.image_source == "FILE" else (
            state.image.name if state.image is not None else "")
        col.label(text=image or "Pick an image above", icon="IMAGE_DATA" if image else "ERROR")
        col = layout.column()
        col.use_property_split = True
        draw_main(col, state.settings, seed_button=True, request=TEXTURE)
        draw_asset(col, state.settings, request=TEXTURE)
        job = session.job
        if job is not None and not job.done:
            draw_progress(layout, job)
        else:
            op = draw_job_button(layout, state, "trellis2.texture", "TEXTURE", request_fields(TEXTURE), is_mesh)
            op.object_name = obj.name if is_mesh else ""


class TRELLIS2_UL_recent(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        layout.label(text=item.name, icon="OBJECT_DATA")


class TRELLIS2_PT_recent(SidebarPanel, bpy.types.Panel):
    bl_idname = "TRELLIS2_PT_recent"
    bl_label = "Recent Results"
    bl_parent_id = "TRELLIS2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        state = context.scene.trellis2
        self.layout.template_list("TRELLIS2_UL_recent", "", state, "recent", state, "recent_index", rows=3)
        row = self.layout.row(align=True)
        row.operator("trellis2.reimport", icon="IMPORT").index = state.recent_index
        row.operator("trellis2.reprocess", icon="MODIFIER").index = state.recent_index


CLASSES = (TRELLIS2_PT_main, TRELLIS2_PT_asset, TRELLIS2_PT_advanced, TRELLIS2_PT_texture, TRELLIS2_UL_recent,
           TRELLIS2_PT_recent)


def register() -> None:
    global _previews
    _previews = bpy.utils.previews.new()


def unregister() -> None:
    global _previews
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
