"""The bpy builder on synthetic results: mesh, UVs, normals, packed images and their colour spaces, the material's
links and render method, naming, placement and selection; the same after save and reload; a million triangles."""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
import pytest

import synthetic
from conftest import addon_module


def build(alpha_mode: str = "BLEND", double_sided: bool = True, n: int = 8, label: str = "plane",
          location=(1.0, 2.0, 3.0), asked: str = "AUTO") -> bpy.types.Object:
    mesh, textures = synthetic.plane_arrays(n=n, texture=64)
    data = addon_module("core.result").mesh_data(mesh, textures, synthetic.metadata(alpha_mode, double_sided, asked))
    view_layer = bpy.context.view_layer
    return addon_module("blender.build").build_object(label, data, view_layer=view_layer,
                                                      collection=view_layer.active_layer_collection.collection,
                                                      location=location)


def links(material: bpy.types.Material) -> set[tuple[str, str, str, str]]:
    return {(l.from_node.bl_idname, l.from_socket.name, l.to_node.bl_idname, l.to_socket.name)
            for l in material.node_tree.links}


BASE_LINKS = {
    ("ShaderNodeTexImage", "Color", "ShaderNodeBsdfPrincipled", "Base Color"),
    ("ShaderNodeTexImage", "Color", "ShaderNodeSeparateColor", "Color"),
    ("ShaderNodeSeparateColor", "Blue", "ShaderNodeBsdfPrincipled", "Metallic"),
    ("ShaderNodeSeparateColor", "Green", "ShaderNodeBsdfPrincipled", "Roughness"),
    ("ShaderNodeBsdfPrincipled", "BSDF", "ShaderNodeOutputMaterial", "Surface"),
}
ALPHA_LINK = ("ShaderNodeTexImage", "Alpha", "ShaderNodeBsdfPrincipled", "Alpha")


def check_object(obj: bpy.types.Object, n: int = 8) -> None:
    """Everything that must hold for the synthetic BLEND plane, before and after a save/reload."""
    mesh, textures = synthetic.plane_arrays(n=n, texture=64)
    me = obj.data
    faces = 2 * (n - 1) ** 2
    assert (len(me.vertices), len(me.polygons), len(me.loops)) == (n * n, faces, 3 * faces)
    positions = np.empty(n * n * 3, np.float32)
    me.attributes["position"].data.foreach_get("vector", positions)
    assert np.array_equal(positions.reshape(-1, 3), mesh["positions"])
    uvs = np.empty(3 * faces * 2, np.float32)
    me.uv_layers["UVMap"].uv.foreach_get("vector", uvs)
    assert np.array_equal(uvs.reshape(-1, 2), mesh["uvs"][mesh["indices"].reshape(-1)])
    normals = np.empty(3 * faces * 3, np.float32)
    me.corner_normals.foreach_get("vector", normals)
    assert np.allclose(normals.reshape(-1, 3), [0, -1, 0], atol=1e-5)
    material = me.materials[0]
    assert links(material) == BASE_LINKS | {ALPHA_LINK}
    assert material.surface_render_method == "DITHERED" and not material.use_backface_culling  # AUTO chose BLEND
    images = {n.label: n.image for n in material.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"}
    base, mr = images["Base Color"], images["Metallic Roughness"]
    assert base.colorspace_settings.name == "sRGB" and mr.colorspace_settings.name == "Non-Color"
    assert base.packed_file is not None and mr.packed_file is not None and tuple(base.size) == (64, 64)
    pixels = np.empty(64 * 64 * 4, np.float32)
    base.pixels.foreach_get(pixels)
    pixels = pixels.reshape(64, 64, 4)
    assert np.allclose(pixels[0, 0], [*(np.array(synthetic.BLUE) / 255), 1.0], atol=1 / 255)  # bottom row: v = 0
    assert np.allclose(pixels[63, 0], [*(np.array(synthetic.RED) / 255), 1.0], atol=1 / 255)
    assert pixels[32, 32, 3] == 0.0  # the hole


def test_the_built_object_is_complete_placed_selected_and_active(scene) -> None:
    other = bpy.data.objects.new("other", None)
    scene.collection.objects.link(other)
    other.select_set(True)
    obj = build(label="chair")
    check_object(obj)
    assert obj.name == "chair" and obj.data.name == "chair" and obj.data.materials[0].name == "chair"
    assert tuple(obj.location) == (1.0, 2.0, 3.0)
    assert bpy.context.view_layer.objects.active == obj
    assert [o.name for o in bpy.context.selected_objects] == ["chair"]


def test_the_object_survives_save_and_reload(scene, tmp_path: Path) -> None:
    build(label="chair")
    path = tmp_path / "chair.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.read_homefile(use_empty=True)
    assert "chair" not in bpy.data.objects
    bpy.ops.wm.open_mainfile(filepath=str(path))
    check_object(bpy.data.objects["chair"])


@pytest.mark.parametrize("alpha_mode, asked, method, alpha_source", [
    ("OPAQUE", "AUTO", "DITHERED", "ShaderNodeTexImage"),
    ("MASK", "AUTO", "DITHERED", "ShaderNodeMath"),
    ("BLEND", "AUTO", "DITHERED", "ShaderNodeTexImage"),  # never sorted unless the user asked for Blend
    ("BLEND", "BLEND", "BLENDED", "ShaderNodeTexImage"),
])
def test_alpha_modes_set_the_render_method_and_the_alpha_path(scene, alpha_mode: str, asked: str, method: str,
                                                              alpha_source: str) -> None:
    material = build(alpha_mode, double_sided=False, asked=asked).data.materials[0]
    assert material.surface_render_method == method and material.use_backface_culling
    alpha_links = material.node_tree.nodes["Principled BSDF"].inputs["Alpha"].links
    assert len(alpha_links) == 1 and alpha_links[0].from_node.bl_idname == alpha_source
    base = next(n for n in material.node_tree.nodes if n.label == "Base Color")
    assert base.image.alpha_mode == ("NONE" if alpha_mode == "OPAQUE" else "STRAIGHT")  # OPAQUE: alpha ignored
    if alpha_mode == "MASK":
        cutoff = alpha_links[0].from_node
        assert cutoff.operation == "GREATER_THAN" and cutoff.inputs[1].default_value == 0.5
        assert cutoff.inputs[0].links[0].from_socket.name == "Alpha"


def test_a_million_triangle_mesh_builds_whole(addon) -> None:
    """Every triangle, corner and UV of a million-triangle result arrives (its speed is measured by
    benchmarks/bench_blender_build.py, not here)."""
    mesh, textures = synthetic.plane_arrays(n=708, texture=256)  # 999,698 triangles
    data = addon_module("core.result").mesh_data(mesh, textures, synthetic.metadata())
    me = addon_module("blender.build").build_mesh("big", data)
    assert len(me.polygons) == 999_698 and len(me.loops) == 3 * 999_698
    assert len(me.vertices) == len(mesh["positions"])
    corners = np.empty(3 * 999_698, dtype=np.int32)
    me.loops.foreach_get("vertex_index", corners)
    assert np.array_equal(corners, mesh["indices"].reshape(-1))
    uv = np.empty(2 * 3 * 999_698, dtype=np.float32)
    me.uv_layers.active.data.foreach_get("uv", uv)
    assert np.allclose(uv.reshape(-1, 2), mesh["uvs"][mesh["indices"].reshape(-1)])
    bpy.data.meshes.remove(me)


def split_cube() -> dict[str, np.ndarray]:
    """A unit cube as a backend result sends it: 4 vertices of its own per side (24), flat normals per side."""
    positions, normals, indices = [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            u, v = [a for a in range(3) if a != axis]
            corners = []
            for cu, cv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = np.zeros(3)
                p[axis], p[u], p[v] = 0.5 * sign, 0.5 * cu, 0.5 * cv
                corners.append(p)
            n = np.zeros(3)
            n[axis] = sign
            first = len(positions)
            positions += corners
            normals += [n] * 4
            quad = [first, first + 1, first + 2, first + 3]
            if np.dot(np.cross(corners[1] - corners[0], corners[2] - corners[0]), n) < 0:
                quad = quad[::-1]
            indices += [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
    positions = np.array(positions, np.float32)
    return {"positions": positions, "indices": np.array(indices, np.uint32), "normals": np.array(normals, np.float32),
            "uvs": (positions[:, :2] + 0.5).astype(np.float32)}


def test_split_vertices_are_welded_into_a_closed_smooth_shaded_mesh_with_sharp_corner_normals(scene) -> None:
    cube = split_cube()
    data = addon_module("core.result").mesh_data(cube, synthetic.textures(16), synthetic.metadata("OPAQUE", False))
    me = addon_module("blender.build").build_mesh("cube", data)
    assert (len(me.vertices), len(me.edges), len(me.polygons)) == (8, 18, 12)  # welded: V - E + F = 2
    counts: dict[tuple[int, int], int] = {}
    for polygon in me.polygons:
        for key in polygon.edge_keys:
            counts[key] = counts.get(key, 0) + 1
    assert sorted(set(counts.values())) == [2]  # every edge on two faces: closed and manifold
    assert all(p.use_smooth for p in me.polygons)
    normals = np.empty(3 * 12 * 3, np.float32)
    me.corner_normals.foreach_get("vector", normals)
    expected = cube["normals"][cube["indices"].reshape(-1)]
    assert np.allclose(normals.reshape(-1, 3), expected, atol=1e-5)  # each side keeps its own (sharp) normal
    uvs = np.empty(3 * 12 * 2, np.float32)
    me.uv_layers["UVMap"].uv.foreach_get("vector", uvs)
    assert np.array_equal(uvs.reshape(-1, 2), cube["uvs"][cube["indices"].reshape(-1)])  # seams survive the weld
    bpy.data.meshes.remove(me)
