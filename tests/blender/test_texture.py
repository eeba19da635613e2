"""Texture Selected against a fake backend (it answers with the UVs it was sent and synthetic textures): what is sent
(the evaluated mesh, triangulated, with per-corner UVs), what the object keeps (vertex positions bit for bit, its
UV maps, modifiers, mesh materials), what it gains (a new UV map only when it had no usable one, a wired material in
its slots), one undo step, reports for objects that cannot be textured, cancel, and the panel section."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
import pytest

import protocol as wire
import synthetic
from conftest import addon_module
from test_build import BASE_LINKS, links
from test_ui import FakeLayout

FAST = dict(texture_size="256", resolution="512", seed=7)


def image(tmp_path: Path, name: str = "look") -> str:
    path = tmp_path / f"{name}.png"
    path.write_bytes(synthetic.subject_png(32))
    return str(path)


def cube(name: str = "Box", uvs: bool = True) -> bpy.types.Object:
    """A unit cube (quads, so triangulation is the request's own), active and selected; with Blender's own UVs."""
    bpy.ops.mesh.primitive_cube_add(size=1.0, calc_uvs=uvs)
    obj = bpy.context.view_layer.objects.active
    obj.name = obj.data.name = name
    return obj


def positions(mesh: bpy.types.Mesh) -> np.ndarray:
    co = np.empty(3 * len(mesh.vertices), np.float32)
    mesh.vertices.foreach_get("co", co)
    return co


def uv_data(mesh: bpy.types.Mesh) -> dict[str, np.ndarray]:
    out = {}
    for layer in mesh.uv_layers:
        uv = np.empty(2 * len(mesh.loops), np.float32)
        layer.uv.foreach_get("vector", uv)
        out[layer.name] = uv
    return out


def evaluated_request_arrays(obj: bpy.types.Object, uv_map: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the request should hold: the evaluated mesh's positions, loop triangles and UVs per triangle corner."""
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        tris = np.empty(3 * len(mesh.loop_triangles), np.int32)
        mesh.loop_triangles.foreach_get("vertices", tris)
        corners = np.empty(3 * len(mesh.loop_triangles), np.int32)
        mesh.loop_triangles.foreach_get("loops", corners)
        return positions(mesh).reshape(-1, 3), tris.reshape(-1, 3), uv_data(mesh)[uv_map].reshape(-1, 2)[corners]
    finally:
        evaluated.to_mesh_clear()


def sent(fake_backend) -> wire.Texture:
    return [m for m in fake_backend.received if isinstance(m, wire.Texture)][-1]


def check_material(obj: bpy.types.Object, uv_map: str, size: int = 256) -> bpy.types.Material:
    """Every slot shows one new material: textures packed and sized as asked, read through `uv_map`, alpha linked
    (the fake answers MASK, cutoff 0.4)."""
    materials = {slot.material for slot in obj.material_slots}
    assert len(materials) == 1 and all(slot.link == "OBJECT" for slot in obj.material_slots)
    material = materials.pop()
    assert material.name == f"{obj.name} TRELLIS.2"
    nodes = material.node_tree.nodes
    assert links(material) >= BASE_LINKS and nodes["Principled BSDF"].inputs["Alpha"].is_linked
    cutoff = nodes["Principled BSDF"].inputs["Alpha"].links[0].from_node
    assert cutoff.operation == "GREATER_THAN" and cutoff.inputs[1].default_value == pytest.approx(0.4)
    uv_node = next(n for n in nodes if n.bl_idname == "ShaderNodeUVMap")
    assert uv_node.uv_map == uv_map
    images = [n for n in nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert len(images) == 2 and all(n.inputs["Vector"].links[0].from_node == uv_node for n in images)
    assert all(n.image.packed_file is not None and tuple(n.image.size) == (size, size) for n in images)
    assert material.use_backface_culling  # the fake's double_sided is False
    return material


# -- the object keeps what it had ------------------------------------------------------------------------


def test_an_object_with_uvs_keeps_geometry_uvs_and_materials_and_shows_the_new_material(scene, fake_backend,
                                                                                         tmp_path, capsys) -> None:
    obj = cube()
    paint = bpy.data.materials.new("Paint")
    obj.data.materials.append(paint)
    before_co, before_uvs = positions(obj.data), uv_data(obj.data)
    assert bpy.ops.trellis2.texture(object_name="Box", image_path=image(tmp_path), **FAST) == {"FINISHED"}
    me = obj.data
    assert np.array_equal(positions(me), before_co)  # bit for bit
    assert list(uv_data(me)) == ["UVMap"] and np.array_equal(uv_data(me)["UVMap"], before_uvs["UVMap"])
    assert [m.name for m in me.materials] == ["Paint"]  # the mesh's own materials stay; the object's slot shows ours
    check_material(obj, "UVMap")
    request = sent(fake_backend)
    expected = evaluated_request_arrays(obj, "UVMap")
    assert request.mesh["indices"].dtype == np.uint32 and request.mesh["indices"].shape == (12, 3)  # 6 quads
    for name, array in zip(("positions", "indices", "uvs"), expected):
        assert np.array_equal(request.mesh[name], array), name
    assert request.settings == {"resolution": 512, "seed": 7, "remove_background": True, "texture_size": 256,
                                "alpha_mode": "AUTO", "alpha_cutoff": 0.5}
    assert obj["trellis2_job"] == "job-1" and not scene.trellis2.recent  # not a re-importable generation
    assert "TRELLIS.2 Box: texture 3/3" in capsys.readouterr().out


def test_an_object_without_uvs_gets_a_named_uv_map_active_for_rendering(scene, fake_backend, tmp_path) -> None:
    obj = cube(uvs=False)
    before_co = positions(obj.data)
    assert bpy.ops.trellis2.texture(image_path=image(tmp_path), **FAST) == {"FINISHED"}  # the active object
    me = obj.data
    assert np.array_equal(positions(me), before_co)
    assert [(layer.name, layer.active_render) for layer in me.uv_layers] == [("TRELLIS.2", True)]
    made = uv_data(me)["TRELLIS.2"].reshape(-1, 2)
    assert made.min() >= 0 and made.max() <= 1 and len(np.unique(made, axis=0)) > 8  # Smart UV Project's islands
    assert np.array_equal(sent(fake_backend).mesh["uvs"], evaluated_request_arrays(obj, "TRELLIS.2")[2])
    check_material(obj, "TRELLIS.2")
    assert len(bpy.data.scenes) == 1 and "TRELLIS.2 unwrap" not in bpy.data.objects  # the unwrap's scratch is gone


def test_unusable_uvs_are_kept_beside_a_new_map(scene, fake_backend, tmp_path) -> None:
    obj = cube()
    tiled = uv_data(obj.data)["UVMap"] * 2 + 1  # UDIM-style tiles: outside [0, 1]
    obj.data.uv_layers["UVMap"].uv.foreach_set("vector", tiled)
    bpy.ops.trellis2.texture(image_path=image(tmp_path), **FAST)
    assert [layer.name for layer in obj.data.uv_layers] == ["UVMap", "TRELLIS.2"]
    assert np.array_equal(uv_data(obj.data)["UVMap"], tiled)
    assert obj.data.uv_layers["TRELLIS.2"].active_render and not obj.data.uv_layers["UVMap"].active_render


def mirrored(obj: bpy.types.Object) -> None:
    obj.data.transform(((1, 0, 0, 1.5), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)))  # off the mirror plane
    obj.modifiers.new("Mirror", "MIRROR")


def subdivided(obj: bpy.types.Object) -> None:
    obj.modifiers.new("Subdivision", "SUBSURF").levels = 2


@pytest.mark.parametrize("with_uvs", [True, False])
@pytest.mark.parametrize("add_modifiers", [mirrored, subdivided])
def test_modifiers_stay_and_the_evaluated_mesh_is_sent(scene, fake_backend, tmp_path, add_modifiers,
                                                       with_uvs: bool) -> None:
    obj = cube(uvs=with_uvs)
    add_modifiers(obj)
    obj.modifiers.new("Bevel", "BEVEL").width = 0.05
    stack = [(m.name, m.type, m.show_viewport, m.show_render) for m in obj.modifiers]
    before_co, before_uvs = positions(obj.data), uv_data(obj.data)
    evaluated_before = evaluated_request_arrays(obj, "UVMap") if with_uvs else None
    assert bpy.ops.trellis2.texture(object_name="Box", image_path=image(tmp_path), **FAST) == {"FINISHED"}
    assert [(m.name, m.type, m.show_viewport, m.show_render) for m in obj.modifiers] == stack
    assert np.array_equal(positions(obj.data), before_co) and len(obj.data.vertices) == 8
    uv_map = "UVMap" if with_uvs else "TRELLIS.2"
    assert [layer.name for layer in obj.data.uv_layers] == [uv_map]
    if with_uvs:
        assert np.array_equal(uv_data(obj.data)["UVMap"], before_uvs["UVMap"])
    request = sent(fake_backend)
    assert len(request.mesh["positions"]) > 8
    if with_uvs:  # exactly the evaluated mesh of the moment
        for name, array in zip(("positions", "indices", "uvs"), evaluated_before):
            assert np.array_equal(request.mesh[name], array), name
    evaluated_now, tris_now, uvs_now = evaluated_request_arrays(obj, uv_map)  # the kept map gives what was sent
    assert np.array_equal(request.mesh["positions"], evaluated_now)
    assert np.array_equal(request.mesh["indices"], tris_now)
    assert np.allclose(request.mesh["uvs"], uvs_now, rtol=0, atol=1e-6)  # a re-evaluation may differ in the last bit
    check_material(obj, uv_map)


def test_shape_keys_stay_and_their_mix_is_sent(scene, fake_backend, tmp_path) -> None:
    obj = cube(uvs=False)
    obj.shape_key_add(name="Basis")
    puff = obj.shape_key_add(name="Puff")
    puff.data[0].co = (1.0, 1.0, 1.0)
    puff.value = 0.5
    puffed = np.empty(24, np.float32)
    puff.data.foreach_get("co", puffed)
    assert bpy.ops.trellis2.texture(image_path=image(tmp_path), **FAST) == {"FINISHED"}
    after = np.empty(24, np.float32)
    obj.data.shape_keys.key_blocks["Puff"].data.foreach_get("co", after)
    assert np.array_equal(after, puffed) and len(bpy.data.shape_keys) == 1  # the unwrap's copy took its own along
    assert np.array_equal(sent(fake_backend).mesh["positions"], evaluated_request_arrays(obj, "TRELLIS.2")[0])
    assert sent(fake_backend).mesh["positions"][0] == pytest.approx([0.25, 0.25, 0.25])  # half way to the key


def test_texturing_is_one_undo_step(scene, fake_backend, tmp_path) -> None:
    obj = cube(uvs=False)
    obj.data.materials.append(bpy.data.materials.new("Paint"))
    bpy.ops.ed.undo_push(message="before")
    assert bpy.ops.trellis2.texture("EXEC_DEFAULT", True, image_path=image(tmp_path), **FAST) == {"FINISHED"}
    assert len(bpy.data.objects["Box"].data.uv_layers) == 1
    bpy.ops.ed.undo()
    box = bpy.data.objects["Box"]
    assert len(box.data.uv_layers) == 0 and [s.link for s in box.material_slots] == ["DATA"]
    assert box.material_slots[0].material.name == "Paint" and "Box TRELLIS.2" not in bpy.data.materials


def test_the_material_and_uv_map_survive_save_and_reload(scene, fake_backend, tmp_path) -> None:
    cube(uvs=False)
    bpy.ops.trellis2.texture(image_path=image(tmp_path), **FAST)
    path = tmp_path / "box.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.open_mainfile(filepath=str(path))
    check_material(bpy.data.objects["Box"], "TRELLIS.2")


# -- what cannot be textured ---------------------------------------------------------------------------


def empty_mesh_object() -> None:
    obj = bpy.data.objects.new("Nothing", bpy.data.meshes.new("Nothing"))
    bpy.context.scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj


def camera() -> None:
    obj = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    bpy.context.scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj


def in_edit_mode() -> None:
    cube()
    bpy.ops.object.mode_set(mode="EDIT")


def no_active_object() -> None:
    cube()
    bpy.context.view_layer.objects.active = None


@pytest.mark.parametrize("make, complaint", [
    (no_active_object, "There is no active object to texture. Select a mesh object first."),
    (camera, "Camera is not a mesh object (its type is Camera)"),
    (empty_mesh_object, "Nothing has no faces (after its modifiers). Select a mesh object with faces."),
    (in_edit_mode, "Box is in Edit Mode. Switch to Object Mode (Tab) first."),
])
def test_objects_that_cannot_be_textured_are_reported(scene, fake_backend, tmp_path, make, complaint: str) -> None:
    make()
    with pytest.raises(RuntimeError) as info:
        bpy.ops.trellis2.texture(image_path=image(tmp_path), **FAST)
    assert str(info.value).startswith("Error: TRELLIS.2: " + complaint)
    assert not any(isinstance(m, wire.Texture) for m in fake_backend.received)


def test_a_missing_object_or_image_is_reported(scene, fake_backend, tmp_path) -> None:
    cube()
    with pytest.raises(RuntimeError, match="There is no object named 'Chair'"):
        bpy.ops.trellis2.texture(object_name="Chair", image_path=image(tmp_path))
    with pytest.raises(RuntimeError, match="Give an image file or a Blender image, exactly one of them"):
        bpy.ops.trellis2.texture(object_name="Box")
    assert [layer.name for layer in bpy.data.objects["Box"].data.uv_layers] == ["UVMap"]


def test_an_object_linked_from_a_library_is_reported(scene, fake_backend, tmp_path) -> None:
    cube()
    library = tmp_path / "library.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(library))
    bpy.ops.wm.read_homefile(use_empty=True)
    with bpy.data.libraries.load(str(library), link=True) as (source, linked):
        linked.objects = ["Box"]
    bpy.context.scene.collection.objects.link(linked.objects[0])
    with pytest.raises(RuntimeError, match="Box or its mesh is linked from a library.*Make Local"):
        bpy.ops.trellis2.texture(object_name="Box", image_path=image(tmp_path))


def test_a_backend_that_cannot_texture_is_reported_and_nothing_changes(scene, prefs, tmp_path) -> None:
    from protocol_fakes import FakeServer, info_for

    def old_backend(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Hello):
            return [info_for()]
        if isinstance(msg, wire.Texture):
            return [wire.Error(wire.ErrorCode.UNSUPPORTED, "this server does not run texture requests",
                               "it offers: cancel, fetch, progress, generate, reprocess", None, msg.client_job_id)]
        return []

    server = FakeServer(old_backend)
    try:
        prefs.backend_mode, prefs.server_address = "REMOTE", server.address
        obj = cube(uvs=False)
        with pytest.raises(RuntimeError, match=r"This server does not run texture requests \[unsupported\]"):
            bpy.ops.trellis2.texture(image_path=image(tmp_path), **FAST)
        assert len(obj.data.uv_layers) == 0 and len(obj.material_slots) == 0
    finally:
        server.stop()


# -- the UI's background path: the timer finishes it, or cancel stops it -------------------------------------


def start_in_background(prefs, obj: bpy.types.Object, tmp_path: Path):
    """What the operator does in the UI: the request made here, the job in a worker thread, the timer to finish."""
    running, texturing = addon_module("blender.running"), addon_module("core.texturing")
    surface = addon_module("blender.texturing").surface_of(bpy.context, obj)
    request = texturing.texture_request(Path(image(tmp_path)).read_bytes(), surface.positions, surface.triangles,
                                        surface.corner_uvs, {"texture_size": 256})
    job = addon_module("core.remote_job").RemoteJob(
        obj.name, running.session.connector(prefs.backend_plan(connecting=True)), request=request,
        read_result=texturing.result_reader(request))
    running.session.job, running.session.target = job, surface.target
    job.start()
    return job


def pump(seconds: float = 10.0) -> None:
    timer, session = addon_module("blender.timer"), addon_module("blender.running").session
    deadline = time.monotonic() + seconds
    while session.job is not None and time.monotonic() < deadline:
        timer.tick()
        time.sleep(0.02)
    assert session.job is None, "the job did not end"


def test_the_ui_path_textures_the_object_as_one_undo_step(scene, prefs, fake_backend, tmp_path) -> None:
    obj = cube(uvs=False)
    bpy.ops.ed.undo_push(message="before")
    start_in_background(prefs, obj, tmp_path)
    assert len(obj.data.uv_layers) == 0  # nothing is written before the textures arrive
    pump()
    assert addon_module("blender.running").session.message == ("INFO", "textured Box (256x256 textures)")
    box = bpy.data.objects["Box"]
    check_material(box, "TRELLIS.2")
    bpy.ops.ed.undo()
    box = bpy.data.objects["Box"]
    assert len(box.data.uv_layers) == 0 and len(box.material_slots) == 0


def test_cancel_stops_the_job_and_leaves_the_object_as_it_was(scene, prefs, tmp_path) -> None:
    from addon_fakes import backend_handler
    from protocol_fakes import FakeServer

    server = FakeServer(backend_handler(finish=False))
    try:
        prefs.backend_mode, prefs.server_address = "REMOTE", server.address
        obj = cube(uvs=False)
        job = start_in_background(prefs, obj, tmp_path)
        deadline = time.monotonic() + 10
        while job.job_id is None and time.monotonic() < deadline:
            job.drain()
            time.sleep(0.02)
        assert bpy.ops.trellis2.cancel() == {"FINISHED"}
        pump()
        assert job.state == "cancelled"
        assert addon_module("blender.running").session.message == ("INFO", "Box was cancelled")
        assert [m.job_id for m in server.received if isinstance(m, wire.Cancel)] == ["job-1"]
        assert len(obj.data.uv_layers) == 0 and len(obj.material_slots) == 0
    finally:
        server.stop()


# -- the panel section ---------------------------------------------------------------------------------------


def draw_texture_section() -> FakeLayout:
    layout = FakeLayout()
    bpy.types.TRELLIS2_PT_texture.draw(SimpleNamespace(layout=layout), bpy.context)
    return layout


def test_the_texture_section_shows_object_image_settings_and_a_button_carrying_them(scene, tmp_path) -> None:
    cube()
    state = scene.trellis2
    state.image_path, state.settings.seed, state.settings.resolution = image(tmp_path, "chair"), 11, "1536"
    state.settings.alpha_mode = "MASK"
    layout = draw_texture_section()
    labels = [(kw.get("text"), kw.get("icon")) for _, kw in layout.calls("label")]
    assert ("Box", "OUTLINER_OB_MESH") in labels and ("chair.png", "IMAGE_DATA") in labels
    assert layout.props() == ["resolution", "seed", "remove_background", "texture_size", "alpha_mode",
                              "alpha_cutoff"]
    texture = layout.operators()["trellis2.texture"]
    assert (texture.object_name, texture.image_path, texture.seed, texture.resolution) == (
        "Box", state.image_path, 11, "1536")
    assert not hasattr(texture, "faces")  # generate's settings are not the texture operator's


def test_the_texture_section_asks_for_a_mesh_and_shows_a_running_jobs_progress(scene, addon) -> None:
    camera()
    labels = [kw.get("text") for _, kw in draw_texture_section().calls("label")]
    assert "Select a mesh object" in labels and "Pick an image above" in labels
    remote_job = addon_module("core.remote_job")
    job = remote_job.RemoteJob("Box", lambda say: None, request=wire.Texture(synthetic.subject_png(8)))
    job.status = remote_job.JobStatus("texture", 4, 12, 0.5)
    addon_module("blender.running").session.job = job
    layout = draw_texture_section()
    (args, kwargs), = layout.calls("progress")
    assert kwargs["text"] == "Box: texture 4/12" and "trellis2.cancel" in layout.operators()
    assert "trellis2.texture" not in layout.operators()
