"""Blender data from a checked result (`core.result.MeshData`): mesh, packed images, material, object.

Mesh: the result's vertices are split along UV seams and creases (as glTF needs); vertices at the same position are
copies of one surface point (backend/asset/textured_mesh.py), so they are welded back into one, and a closed object
is a closed mesh in Blender too (solidify, booleans, 3D printing). UVs and normals live on the face corners, so the
seams and creases survive the weld: the faces are smooth-shaded and each corner gets its normal, smooth where the
surface is smooth and split at creases.

Speed: the mesh is written through attribute-level `foreach_set` (`position`, `.corner_vert`), 30-100x faster than
`vertices.co` / `loops.vertex_index` and far faster than `from_pydata`; corner normals go into the `custom_normal`
attribute (free normals, Blender 4.5+) instead of `normals_split_custom_set`, which takes about a second per million
triangles. Images: the colour space is set before the pixels are written, since setting it
afterwards silently discards them.

Material: Principled BSDF with base colour, metallic (blue) and roughness (green) from the glTF-layout texture, and
the base colour's alpha always linked to Alpha, so transparency can be turned on later by the user:
OPAQUE reads the image with alpha ignored, MASK passes alpha through a cutoff, BLEND passes alpha as it is. The
render method is Dithered (no sorting) unless the request itself asked for BLEND, which renders Blended. The same
material textures an existing object (blender/texturing.py), then through a UV Map node naming the UV map used.
"""

from __future__ import annotations

import bpy
import numpy as np

from ..core.result import Material, MeshData, Texture

FREE_NORMALS = bpy.app.version >= (4, 5, 0)


def weld(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one row per distinct position, in order of first use; the row of each input vertex): bit-identical
    positions become one vertex."""
    keys = np.ascontiguousarray(positions, dtype=np.float32).view(np.dtype((np.void, 12))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return np.ascontiguousarray(positions[first[order]], dtype=np.float32), rank[inverse.reshape(-1)]


def build_mesh(name: str, data: MeshData) -> bpy.types.Mesh:
    faces = data.face_count
    positions, row = weld(data.positions)
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(positions))
    mesh.loops.add(3 * faces)
    mesh.polygons.add(faces)
    mesh.attributes["position"].data.foreach_set("vector", positions.ravel())
    mesh.attributes[".corner_vert"].data.foreach_set("value", row[data.corner_verts].astype(np.int32))
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * faces, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    mesh.uv_layers.new(name="UVMap").uv.foreach_set("vector", data.corner_uvs.ravel())
    mesh.polygons.foreach_set("use_smooth", np.ones(faces, dtype=bool))
    corner_normals = np.ascontiguousarray(data.normals[data.corner_verts], dtype=np.float32)
    if FREE_NORMALS:
        normals = mesh.attributes.new("custom_normal", "FLOAT_VECTOR", "CORNER")
        normals.data.foreach_set("vector", corner_normals.ravel())
    else:
        mesh.normals_split_custom_set(corner_normals)
    return mesh


def build_image(name: str, texture: Texture, *, non_color: bool, ignore_alpha: bool = False) -> bpy.types.Image:
    image = bpy.data.images.new(name, width=texture.width, height=texture.height, alpha=True, float_buffer=False)
    if non_color:
        image.colorspace_settings.name = "Non-Color"
    if ignore_alpha:
        image.alpha_mode = "NONE"
    image.pixels.foreach_set(texture.pixels)  # after the colour space and alpha mode, see the module docstring
    image.pack()
    return image


def build_material(name: str, data: Material, uv_map: str | None = None) -> bpy.types.Material:
    """The material with its two packed images; with `uv_map`, the images read that UV map (else the active one)."""
    base_color = build_image(f"{name} base color", data.base_color, non_color=False,
                             ignore_alpha=data.alpha_mode == "OPAQUE")
    metallic_roughness = build_image(f"{name} metallic roughness", data.metallic_roughness, non_color=True)
    material = bpy.data.materials.new(name)
    if not material.node_tree:  # Blender < 5.0 creates materials without nodes
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    nodes.clear()
    output = nodes.new("ShaderNodeOutputMaterial")
    output.location = (300, 0)
    bsdf = nodes.new("ShaderNodeBsdfPrincipled")
    bsdf.location = (0, 0)
    base = nodes.new("ShaderNodeTexImage")
    base.image, base.location, base.label = base_color, (-700, 250), "Base Color"
    mr = nodes.new("ShaderNodeTexImage")
    mr.image, mr.location, mr.label = metallic_roughness, (-700, -150), "Metallic Roughness"
    split = nodes.new("ShaderNodeSeparateColor")
    split.location = (-350, -150)
    links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    links.new(base.outputs["Color"], bsdf.inputs["Base Color"])
    links.new(mr.outputs["Color"], split.inputs["Color"])
    links.new(split.outputs["Blue"], bsdf.inputs["Metallic"])  # glTF: B = metallic, G = roughness
    links.new(split.outputs["Green"], bsdf.inputs["Roughness"])
    if uv_map is not None:
        uv = nodes.new("ShaderNodeUVMap")
        uv.uv_map, uv.location = uv_map, (-1000, 50)
        links.new(uv.outputs["UV"], base.inputs["Vector"])
        links.new(uv.outputs["UV"], mr.inputs["Vector"])
    if data.alpha_mode == "MASK":
        cutoff = nodes.new("ShaderNodeMath")
        cutoff.operation, cutoff.location, cutoff.label = "GREATER_THAN", (-350, 100), "Alpha Cutoff"
        cutoff.inputs[1].default_value = data.alpha_cutoff
        links.new(base.outputs["Alpha"], cutoff.inputs[0])
        links.new(cutoff.outputs["Value"], bsdf.inputs["Alpha"])
    else:
        links.new(base.outputs["Alpha"], bsdf.inputs["Alpha"])
    material.surface_render_method = "BLENDED" if data.sorted_blend else "DITHERED"
    material.use_backface_culling = not data.double_sided
    return material


def build_object(name: str, data: MeshData, *, view_layer: bpy.types.ViewLayer, collection: bpy.types.Collection,
                 location: tuple[float, float, float]) -> bpy.types.Object:
    """The finished object at `location`, linked into `collection`, the only selected object and the active one."""
    mesh = build_mesh(name, data)
    mesh.materials.append(build_material(name, data.material))
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    collection.objects.link(obj)
    for other in view_layer.objects:
        other.select_set(False, view_layer=view_layer)
    obj.select_set(True, view_layer=view_layer)
    view_layer.objects.active = obj
    return obj
