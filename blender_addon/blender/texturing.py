"""Texture Selected in Blender: the object's evaluated mesh as request arrays, the UV map its textures go into, and
the finished material put on the object.

What is sent is the evaluated mesh (modifiers applied, object space), triangulated for the request only
(`loop_triangles`), with the per-corner UVs of a usable UV map of it (core/texturing.py's rule), render-active map
first. UVs belong to the base mesh, which the modifiers carry them from, so an object without a usable map gets a
new one made on a copy of its base mesh by Blender's Smart UV Project (in a scene of its own, so the user's
selection, modes and objects stay as they are), and the evaluated UVs of that map are read through a layer that
exists on the base mesh only while they are read. The map itself is written when the textures arrive, together
with the material: one undo step, and nothing left behind by a failed or cancelled job. The user's modifiers,
geometry, other UV maps and materials are never touched: the new material fills every material slot of the object
through object-linked slots (the mesh keeps its own materials and face assignments).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from math import radians
from typing import Iterator

import bpy
import numpy as np

from ..core.errors import AddonError
from ..core.result import SurfaceTextures
from ..core.session import SurfaceTarget
from ..core.texturing import UV_MAP_NAME, check_surface, uv_problem
from .build import build_material

MAX_UV_MAPS = 8  # Blender's limit per mesh
SMART_PROJECT = dict(angle_limit=radians(66.0), island_margin=0.005, area_weight=0.0, correct_aspect=True,
                     scale_to_bounds=False)
AGAIN = "Texture it again."


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class Surface:
    """What a texture request sends of an object, and where its result goes."""

    positions: np.ndarray  # float32 [N, 3], the evaluated mesh's vertices in object space
    triangles: np.ndarray  # int32 [F, 3]
    corner_uvs: np.ndarray  # float32 [3F, 2]
    target: SurfaceTarget


def chosen_object(context: bpy.types.Context, name: str) -> bpy.types.Object:
    """The object called `name`, or the active object when `name` is empty: a mesh object in Object Mode."""
    if name:
        obj = bpy.data.objects.get(name)
        if obj is None:
            raise AddonError(f"There is no object named {name!r}", "Pass the name of an existing mesh object.")
    else:
        obj = context.view_layer.objects.active if context.view_layer else None
        if obj is None:
            raise AddonError("There is no active object to texture", "Select a mesh object first.")
    if obj.type != "MESH":
        raise AddonError(f"{obj.name} is not a mesh object (its type is {obj.type.title()})",
                         "Select a mesh object.")
    if obj.mode == "EDIT":
        raise AddonError(f"{obj.name} is in Edit Mode", "Switch to Object Mode (Tab) first.")
    if not (obj.is_editable and obj.data.is_editable):
        raise AddonError(f"{obj.name} or its mesh is linked from a library and cannot be changed",
                         "Make it local first (Object > Relations > Make Local).")
    return obj


def surface_of(context: bpy.types.Context, obj: bpy.types.Object) -> Surface:
    """The request arrays of `obj` with a usable UV map: its own, else a new one (made, not yet kept)."""
    mesh = obj.data
    maps = [layer.name for layer in sorted(mesh.uv_layers, key=lambda layer: not layer.active_render)]
    with evaluated(context, obj) as evaluated_mesh:
        positions, triangles, corners = triangles_of(evaluated_mesh)
        check_surface(obj.name, positions, triangles)
        reasons = {}
        for name in maps:
            uvs = corner_uvs(evaluated_mesh, name, corners)
            reasons[name] = "its modifiers drop it" if uvs is None else uv_problem(positions, triangles, uvs)
            if reasons[name] is None:
                return Surface(positions, triangles, uvs, SurfaceTarget(obj.name, name))
    if len(maps) >= MAX_UV_MAPS:
        raise AddonError(f"{obj.name} has {len(maps)} UV maps, the most Blender allows, and none is usable ("
                         + "; ".join(f"{name}: {why}" for name, why in reasons.items()) + ")",
                         "Delete one, or fix one so it lies inside [0, 1] without collapsed faces.")
    new_uvs = smart_project(mesh)
    with transient_uv_map(mesh, new_uvs) as name, evaluated(context, obj) as evaluated_mesh:
        uvs = corner_uvs(evaluated_mesh, name, corners)
    why = "its modifiers drop it" if uvs is None else uv_problem(positions, triangles, uvs)
    if why is not None:
        raise AddonError(f"A new UV map of {obj.name} is not usable after its modifiers: {why}",
                         "Check modifiers that move or drop UVs (e.g. Mirror's UV offsets, Geometry Nodes).")
    return Surface(positions, triangles, uvs, SurfaceTarget(obj.name, name, new_uvs))


@contextmanager
def evaluated(context: bpy.types.Context, obj: bpy.types.Object) -> Iterator[bpy.types.Mesh]:
    """The object's evaluated mesh (modifiers applied, object space), freed afterwards."""
    evaluated_object = obj.evaluated_get(context.evaluated_depsgraph_get())
    try:
        yield evaluated_object.to_mesh()
    finally:
        evaluated_object.to_mesh_clear()


def triangles_of(mesh: bpy.types.Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions float32 [N, 3], triangles int32 [F, 3], the mesh corner of each triangle corner int32 [3F])."""
    mesh.calc_loop_triangles()
    positions = np.empty(3 * len(mesh.vertices), np.float32)
    if len(positions):  # a mesh without vertices has no position attribute
        mesh.attributes["position"].data.foreach_get("vector", positions)
    triangles = np.empty(3 * len(mesh.loop_triangles), np.int32)
    mesh.loop_triangles.foreach_get("vertices", triangles)
    corners = np.empty(3 * len(mesh.loop_triangles), np.int32)
    mesh.loop_triangles.foreach_get("loops", corners)
    return positions.reshape(-1, 3), triangles.reshape(-1, 3), corners


def corner_uvs(mesh: bpy.types.Mesh, uv_map: str, corners: np.ndarray) -> np.ndarray | None:
    """The UV map's UVs at the given mesh corners, float32 [len(corners), 2]; None if the mesh lacks the map."""
    layer = mesh.uv_layers.get(uv_map)
    if layer is None:
        return None
    uvs = np.empty(2 * len(mesh.loops), np.float32)
    layer.uv.foreach_get("vector", uvs)
    return uvs.reshape(-1, 2)[corners]


def smart_project(mesh: bpy.types.Mesh) -> np.ndarray:
    """Smart UV Project of the mesh, per corner float32 [corners, 2], made on a copy in a scene of its own."""
    scene = bpy.data.scenes.new("TRELLIS.2 unwrap")
    copy = mesh.copy()
    obj = bpy.data.objects.new("TRELLIS.2 unwrap", copy)
    try:
        scene.collection.objects.link(obj)
        while copy.uv_layers:
            copy.uv_layers.remove(copy.uv_layers[0])
        copy.uv_layers.new(name=UV_MAP_NAME)
        view_layer = scene.view_layers[0]
        view_layer.objects.active = obj
        here = dict(scene=scene, view_layer=view_layer, active_object=obj, object=obj, selected_objects=[obj],
                    selected_editable_objects=[obj])
        with bpy.context.temp_override(**here):
            bpy.ops.object.mode_set(mode="EDIT")
        try:
            with bpy.context.temp_override(**here, edit_object=obj):
                bpy.ops.mesh.reveal(select=True)
                bpy.ops.mesh.select_all(action="SELECT")
                bpy.ops.uv.smart_project(**SMART_PROJECT)
        finally:
            with bpy.context.temp_override(**here, edit_object=obj):
                bpy.ops.object.mode_set(mode="OBJECT")
        if not np.array_equal(_corner_verts(copy), _corner_verts(mesh)):
            raise AddonError(f"Unwrapping {mesh.name} reordered its faces", "Report this with the .blend file.")
        uvs = np.empty(2 * len(copy.loops), np.float32)
        copy.uv_layers[0].uv.foreach_get("vector", uvs)
        return uvs.reshape(-1, 2)
    finally:
        bpy.data.objects.remove(obj)
        bpy.data.meshes.remove(copy)
        bpy.data.scenes.remove(scene)


def _corner_verts(mesh: bpy.types.Mesh) -> np.ndarray:
    verts = np.empty(len(mesh.loops), np.int32)
    mesh.attributes[".corner_vert"].data.foreach_get("value", verts)
    return verts


@contextmanager
def transient_uv_map(mesh: bpy.types.Mesh, uvs: np.ndarray) -> Iterator[str]:
    """A UV map holding `uvs` on the mesh while the block runs (so the modifiers carry it); its name."""
    name = add_uv_map(mesh, uvs).name
    try:
        yield name
    finally:
        mesh.uv_layers.remove(mesh.uv_layers[name])
        mesh.update_tag()


def add_uv_map(mesh: bpy.types.Mesh, uvs: np.ndarray) -> bpy.types.MeshUVLoopLayer:
    layer = mesh.uv_layers.new(name=UV_MAP_NAME, do_init=False)
    if layer is None:
        raise AddonError(f"{mesh.name} has {MAX_UV_MAPS} UV maps, the most Blender allows",
                         "Delete one, then texture it again.")
    layer.uv.foreach_set("vector", np.ascontiguousarray(uvs, dtype=np.float32).ravel())
    mesh.update_tag()
    return layer


def paint(target: SurfaceTarget, textures: SurfaceTextures) -> bpy.types.Object:
    """Put a texture job's result on its object: the new UV map (if one was made, active for rendering) and the
    material in every slot. Checks first, so a vanished or edited object changes nothing."""
    obj = bpy.data.objects.get(target.label)
    if obj is None or obj.type != "MESH":
        raise AddonError(f"The object {target.label} is gone", AGAIN)
    mesh = obj.data
    uv_map = target.uv_map
    if target.new_uvs is None:
        if uv_map not in mesh.uv_layers:
            raise AddonError(f"The UV map {uv_map} of {obj.name} is gone", AGAIN)
    elif len(target.new_uvs) != len(mesh.loops):
        raise AddonError(f"{obj.name} was edited while it was being textured", AGAIN)
    else:
        layer = add_uv_map(mesh, target.new_uvs)
        layer.active_render = True
        uv_map = layer.name
    material = build_material(f"{obj.name} TRELLIS.2", textures.material, uv_map=uv_map)
    if not obj.material_slots:
        mesh.materials.append(None)
    for slot in obj.material_slots:
        slot.link = "OBJECT"
        slot.material = material
    return obj
