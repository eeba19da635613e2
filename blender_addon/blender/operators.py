"""Operators. `bpy.ops.trellis2.generate(image_path=..., **settings)` and `bpy.ops.trellis2.texture(object_name=...,
image_path=..., **settings)` are also the scripting and batch API: under `blender -b` they return once the object
exists or is textured (a generated object is then the active object); in the UI they return at once and the result
appears when the backend is done.

Every failure is reported as `TRELLIS.2: <what happened>. <what to do>` through `self.report`, never a traceback.
"""

import random
import tempfile
from pathlib import Path

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from ..core import settings as core_settings
from ..core.errors import AddonError, user_error
from ..core.remote_job import ReadResult, RemoteJob, read_asset
from ..core.session import LOCAL, SurfaceTarget, Target, progress_printer
from ..core.texturing import result_reader, texture_request
from ..protocol import Generate, Reprocess, Request, image_info
from ..protocol.settings import GENERATE, REPROCESS, SEED_MAX, TEXTURE
from . import running
from .preferences import preferences
from .properties import settings_annotations, settings_of
from .running import session
from .texturing import chosen_object, surface_of
from .timer import load_defaults

TEXTURE_FIELDS = core_settings.request_fields(TEXTURE)


def read_image_file(path: str) -> tuple[bytes, str]:
    """The file's bytes and its stem, the object's name."""
    file = Path(bpy.path.abspath(path))
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise AddonError(f"Cannot read the image {file}: {exc.strerror or exc}", "Choose an existing image file.")
    return data, file.stem


def read_blender_image(image: bpy.types.Image) -> tuple[bytes, str]:
    """An image datablock's encoded bytes: packed data, its unchanged file, or (generated/edited) a PNG of it."""
    label = Path(image.name).stem or image.name
    if image.packed_file is not None:
        return bytes(image.packed_file.data), label
    path = Path(bpy.path.abspath(image.filepath)) if image.filepath else None
    if image.source == "FILE" and not image.is_dirty and path is not None and path.is_file():
        return read_image_file(str(path))[0], label
    if not image.has_data:
        raise AddonError(f"The image {image.name!r} has no pixels", "Open or paint the image first.")
    with tempfile.TemporaryDirectory() as tmp:
        copy = image.copy()  # saving the original would turn it into a file image
        try:
            copy.file_format = "PNG"
            copy.save(filepath=str(Path(tmp) / "image.png"))
            return (Path(tmp) / "image.png").read_bytes(), label
        finally:
            bpy.data.images.remove(copy)


def chosen_image(image_path: str, image_name: str) -> tuple[bytes, str]:
    """The image an operator was given (a file or a Blender image, exactly one): its bytes and label."""
    if bool(image_path) == bool(image_name):
        raise AddonError("Give an image file or a Blender image, exactly one of them",
                         "Pick an image in the TRELLIS.2 panel, or pass image_path= or image_name=.")
    if image_path:
        image, label = read_image_file(image_path)
    elif image_name in bpy.data.images:
        image, label = read_blender_image(bpy.data.images[image_name])
    else:
        raise AddonError(f"There is no Blender image named {image_name!r}", "Pick an existing image.")
    image_info(image)  # InvalidImage, with its hint, for anything but PNG, JPEG, WebP, BMP and TIFF
    return image, label


def start(op: bpy.types.Operator, context: bpy.types.Context, request: Request, target: Target | SurfaceTarget,
          read_result: ReadResult = read_asset) -> set[str]:
    """Send `request` to the backend the preferences name, as a job whose outcome goes to `target`."""
    job = RemoteJob(target.label, session.connector(preferences(context).backend_plan(connecting=True)),
                    request=request, read_result=read_result,
                    on_event=progress_printer() if bpy.app.background else None)
    return running.launch(op, job, target)


def given_settings(op: bpy.types.Operator, context: bpy.types.Context,
                   fields: dict = core_settings.FIELDS) -> dict:
    """The operator's settings: those it was given over the preferences' defaults."""
    given = {name: value for name, value in settings_of(op, fields).items() if op.properties.is_property_set(name)}
    return core_settings.resolve(given, settings_of(preferences(context).defaults))


class Trellis2Operator(bpy.types.Operator):
    """Base of the operators that can fail: subclasses implement `run`, whose exceptions become an error report
    and CANCELLED, never a traceback."""

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            return self.run(context)
        except Exception as exc:
            self.report({"ERROR"}, f"TRELLIS.2: {user_error(exc)}")
            return {"CANCELLED"}

    @classmethod
    def idle(cls) -> bool:
        if session.busy:
            cls.poll_message_set("A TRELLIS.2 job is running")
            return False
        return True


def image_annotations(purpose: str) -> dict:
    """The image_path / image_name properties of an operator that sends an image."""
    return {"image_path": StringProperty(name="Image File", subtype="FILE_PATH", options={"SKIP_SAVE"},
                                         description=purpose),
            "image_name": StringProperty(name="Blender Image", options={"SKIP_SAVE"},
                                         description="Name of an image already in Blender (instead of a file)")}


class ImageJobOperator(Trellis2Operator):
    """Base of the operators that send an image as a new job: one job at a time."""

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return cls.idle()


class TRELLIS2_OT_generate(ImageJobOperator):
    """Turn an image into a textured object with the TRELLIS.2 backend"""

    bl_idname = "trellis2.generate"
    bl_label = "Generate"
    bl_options = {"UNDO"}  # no REGISTER: a redo panel would re-run the generation
    __annotations__ = {
        **image_annotations("The image file to turn into an object"),
        # Settings left unset take the preferences' defaults (the panel's button sets them all).
        **settings_annotations({"SKIP_SAVE"}),
    }

    def run(self, context: bpy.types.Context) -> set[str]:
        settings = given_settings(self, context)
        image, label = chosen_image(self.image_path, self.image_name)
        extras = {item.name: item.value for item in context.scene.trellis2.extras}
        request = Generate(image, core_settings.request_settings(settings, GENERATE, extras))
        return start(self, context, request, running.target_here(context, label, settings))


class TRELLIS2_OT_texture(ImageJobOperator):
    """Texture the active mesh object from an image with the TRELLIS.2 backend (a new material; its geometry, UV
    maps and modifiers stay as they are)"""

    bl_idname = "trellis2.texture"
    bl_label = "Texture Selected"
    bl_options = {"UNDO"}  # no REGISTER: a redo panel would re-run the texturing
    __annotations__ = {
        "object_name": StringProperty(name="Object", options={"SKIP_SAVE"},
                                      description="The mesh object to texture (empty: the active object)"),
        **image_annotations("The image whose look the object gets"),
        **settings_annotations({"SKIP_SAVE"}, TEXTURE_FIELDS),
    }

    def run(self, context: bpy.types.Context) -> set[str]:
        settings = given_settings(self, context, TEXTURE_FIELDS)
        obj = chosen_object(context, self.object_name)
        image, _ = chosen_image(self.image_path, self.image_name)
        surface = surface_of(context, obj)
        request = texture_request(image, surface.positions, surface.triangles, surface.corner_uvs,
                                  core_settings.request_settings(settings, TEXTURE))
        return start(self, context, request, surface.target, result_reader(request))


class RecentOperator(Trellis2Operator):
    index: IntProperty(name="Index", description="Which recent result (0: the newest)", options={"SKIP_SAVE"})  # type: ignore[valid-type]

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return bool(context.scene and len(context.scene.trellis2.recent)) and cls.idle()

    def recent(self, context: bpy.types.Context):
        recent = context.scene.trellis2.recent
        if not 0 <= self.index < len(recent):
            raise AddonError(f"There is no recent result {self.index}", "Pick one from the Recent Results list.")
        return recent[self.index]


class TRELLIS2_OT_reimport(RecentOperator):
    """Build a recent result again from the backend's job store (no new generation)"""

    bl_idname = "trellis2.reimport"
    bl_label = "Re-import"
    bl_options = {"UNDO"}  # no REGISTER: a redo panel would re-run the generation

    def run(self, context: bpy.types.Context) -> set[str]:
        item = self.recent(context)
        job = RemoteJob(item.name, session.connector(preferences(context).backend_plan(connecting=True)),
                        fetch_job_id=item.job_id)
        return running.launch(self, job, running.target_here(context, item.name, item.settings, remember_it=False))


class TRELLIS2_OT_reprocess(RecentOperator):
    """Rebuild a recent result's mesh and textures with the panel's current asset settings (no new generation)"""

    bl_idname = "trellis2.reprocess"
    bl_label = "Re-process"
    bl_options = {"UNDO"}  # no REGISTER: a redo panel would re-run the generation

    def run(self, context: bpy.types.Context) -> set[str]:
        item = self.recent(context)
        panel = settings_of(context.scene.trellis2.settings)
        asset = {s.name: panel[s.name] for s in core_settings.in_section("asset", REPROCESS)}
        settings = core_settings.resolve({**item.settings, **asset})
        request = Reprocess(item.job_id, core_settings.request_settings(settings, REPROCESS))
        return start(self, context, request, running.target_here(context, item.name, settings))


class TRELLIS2_OT_cancel(bpy.types.Operator):
    """Cancel the running job on the backend"""

    bl_idname = "trellis2.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return session.busy

    def execute(self, context: bpy.types.Context) -> set[str]:
        session.job.cancel()
        self.report({"INFO"}, "TRELLIS.2: cancelling")
        return {"FINISHED"}


class TRELLIS2_OT_randomize_seed(bpy.types.Operator):
    """Pick a new random seed"""

    bl_idname = "trellis2.randomize_seed"
    bl_label = "Randomise Seed"
    bl_options = {"UNDO", "INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        context.scene.trellis2.settings.seed = random.randint(0, SEED_MAX)
        return {"FINISHED"}


class TRELLIS2_OT_load_defaults(bpy.types.Operator):
    """Set the panel's settings to the defaults from the add-on's preferences"""

    bl_idname = "trellis2.load_defaults"
    bl_label = "Load Default Settings"
    bl_options = {"UNDO", "INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        load_defaults(context.scene.trellis2, preferences(context))
        return {"FINISHED"}


class TRELLIS2_OT_start_backend(Trellis2Operator):
    """Start the local backend now (it also starts by itself on the first Generate)"""

    bl_idname = "trellis2.start_backend"
    bl_label = "Start Backend"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return preferences(context).backend_mode == LOCAL and not session.backend.running

    def run(self, context: bpy.types.Context) -> set[str]:
        session.start_local_in_background(preferences(context).backend_plan(connecting=True))
        return {"FINISHED"}


class TRELLIS2_OT_stop_backend(bpy.types.Operator):
    """Stop the local backend (a running job is cancelled)"""

    bl_idname = "trellis2.stop_backend"
    bl_label = "Stop Backend"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return session.backend.running

    def execute(self, context: bpy.types.Context) -> set[str]:
        session.backend.stop()
        return {"FINISHED"}


class TRELLIS2_OT_report(bpy.types.Operator):
    """Show a message in the status bar (used by the add-on's timer, which cannot report by itself)"""

    bl_idname = "trellis2.report"
    bl_label = "Report"
    bl_options = {"INTERNAL"}

    level: EnumProperty(items=[(x, x, "") for x in ("INFO", "WARNING", "ERROR")])  # type: ignore[valid-type]
    message: StringProperty()  # type: ignore[valid-type]

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({self.level}, self.message)
        return {"FINISHED"}


CLASSES = (TRELLIS2_OT_generate, TRELLIS2_OT_texture, TRELLIS2_OT_reimport, TRELLIS2_OT_reprocess, TRELLIS2_OT_cancel,
           TRELLIS2_OT_randomize_seed, TRELLIS2_OT_load_defaults, TRELLIS2_OT_start_backend,
           TRELLIS2_OT_stop_backend, TRELLIS2_OT_report)
