"""TexturedMesh <-> binary glTF (.glb): one mesh, one primitive, one metal/rough material with PNG textures.

The file follows glTF's conventions, so the conversions live here and nowhere else (spec §7.4 items 6-7):
positions and normals Z-up -> Y-up as (x, y, z) -> (x, z, -y); UVs v-up -> glTF's v-down as (u, 1 - v), which
keeps texture rows top first; base colour RGBA, metallicRoughness RGB with G = roughness, B = metallic.
Unlike the reference (always OPAQUE), the alpha mode, cutoff and double-sidedness are the mesh's own.
`read_glb` inverts all of it, so tests (and tools) can check a round trip.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pygltflib as gl
from PIL import Image

from backend.asset.textured_mesh import TexturedMesh

GENERATOR = "TRELLIS.2 for Blender"
_COMPONENT = {np.dtype(np.float32): gl.FLOAT, np.dtype(np.uint32): gl.UNSIGNED_INT}
_NUMPY = {gl.FLOAT: np.float32, gl.UNSIGNED_INT: np.uint32, gl.UNSIGNED_SHORT: np.uint16, gl.UNSIGNED_BYTE: np.uint8}
_WIDTH = {gl.SCALAR: 1, gl.VEC2: 2, gl.VEC3: 3, gl.VEC4: 4}


def z_up_to_y_up(xyz: np.ndarray) -> np.ndarray:
    return np.stack([xyz[:, 0], xyz[:, 2], -xyz[:, 1]], axis=1)


def y_up_to_z_up(xyz: np.ndarray) -> np.ndarray:
    return np.stack([xyz[:, 0], -xyz[:, 2], xyz[:, 1]], axis=1)


def write_glb(mesh: TexturedMesh, path: str | Path) -> None:
    """Write `mesh` as a .glb (atomically: a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(glb_bytes(mesh))
    tmp.replace(path)


def glb_bytes(mesh: TexturedMesh) -> bytes:
    _check(mesh)
    blob = _Blob()
    uv = np.asarray(mesh.uvs, dtype=np.float32)
    positions = blob.accessor(z_up_to_y_up(np.asarray(mesh.positions, dtype=np.float32)), gl.VEC3,
                              gl.ARRAY_BUFFER, bounds=True)
    normals = blob.accessor(z_up_to_y_up(np.asarray(mesh.normals, dtype=np.float32)), gl.VEC3, gl.ARRAY_BUFFER)
    uvs = blob.accessor(np.stack([uv[:, 0], 1 - uv[:, 1]], axis=1), gl.VEC2, gl.ARRAY_BUFFER)
    indices = blob.accessor(np.asarray(mesh.indices, dtype=np.uint32).reshape(-1, 1), gl.SCALAR,
                            gl.ELEMENT_ARRAY_BUFFER)
    base = blob.image(mesh.base_color)
    metal_rough = blob.image(mesh.metallic_roughness)

    material = gl.Material(
        name="trellis2",
        pbrMetallicRoughness=gl.PbrMetallicRoughness(
            baseColorFactor=[1.0, 1.0, 1.0, 1.0],
            baseColorTexture=gl.TextureInfo(index=0),
            metallicFactor=1.0,
            roughnessFactor=1.0,
            metallicRoughnessTexture=gl.TextureInfo(index=1),
        ),
        alphaMode=mesh.alpha_mode,
        alphaCutoff=float(mesh.alpha_cutoff) if mesh.alpha_mode == "MASK" else None,
        doubleSided=bool(mesh.double_sided),
    )
    gltf = gl.GLTF2(
        asset=gl.Asset(version="2.0", generator=GENERATOR),
        scene=0,
        scenes=[gl.Scene(nodes=[0])],
        nodes=[gl.Node(mesh=0, name="trellis2")],
        meshes=[gl.Mesh(name="trellis2", primitives=[gl.Primitive(
            attributes=gl.Attributes(POSITION=positions, NORMAL=normals, TEXCOORD_0=uvs),
            indices=indices, material=0, mode=gl.TRIANGLES)])],
        materials=[material],
        samplers=[gl.Sampler(magFilter=gl.LINEAR, minFilter=gl.LINEAR_MIPMAP_LINEAR)],
        textures=[gl.Texture(sampler=0, source=base), gl.Texture(sampler=0, source=metal_rough)],
        images=blob.images,
        accessors=blob.accessors,
        bufferViews=blob.views,
        buffers=[gl.Buffer(byteLength=len(blob.data))],
    )
    gltf.set_binary_blob(bytes(blob.data))
    return b"".join(gltf.save_to_bytes())


def read_glb(path: str | Path) -> TexturedMesh:
    """Read a .glb holding one triangle primitive with textures as `write_glb` writes them, back in our frame."""
    gltf = gl.GLTF2.load_binary(str(path))
    data = gltf.binary_blob()
    meshes = gltf.meshes or []
    if len(meshes) != 1 or len(meshes[0].primitives) != 1:
        raise ValueError(f"{path}: expected exactly one mesh with one primitive")
    prim = meshes[0].primitives[0]
    if prim.mode not in (None, gl.TRIANGLES) or prim.material is None:
        raise ValueError(f"{path}: expected an indexed triangle primitive with a material")
    attrs = prim.attributes
    if None in (attrs.POSITION, attrs.NORMAL, attrs.TEXCOORD_0, prim.indices):
        raise ValueError(f"{path}: the primitive lacks positions, normals, UVs or indices")
    uv = _read_accessor(gltf, data, attrs.TEXCOORD_0)
    mat = gltf.materials[prim.material]
    pbr = mat.pbrMetallicRoughness
    if pbr is None or pbr.baseColorTexture is None or pbr.metallicRoughnessTexture is None:
        raise ValueError(f"{path}: the material lacks a base colour or metallic-roughness texture")
    return TexturedMesh(
        positions=y_up_to_z_up(_read_accessor(gltf, data, attrs.POSITION)),
        indices=_read_accessor(gltf, data, prim.indices).reshape(-1, 3).astype(np.int32),
        normals=y_up_to_z_up(_read_accessor(gltf, data, attrs.NORMAL)),
        uvs=np.stack([uv[:, 0], 1 - uv[:, 1]], axis=1).astype(np.float32),
        base_color=_read_image(gltf, data, pbr.baseColorTexture.index, "RGBA"),
        metallic_roughness=_read_image(gltf, data, pbr.metallicRoughnessTexture.index, "RGB"),
        alpha_mode=mat.alphaMode or "OPAQUE",
        alpha_cutoff=mat.alphaCutoff if mat.alphaCutoff is not None else 0.5,
        double_sided=bool(mat.doubleSided),
    )


class _Blob:
    """The binary chunk being assembled, with its buffer views, accessors and images (4-byte aligned)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[gl.BufferView] = []
        self.accessors: list[gl.Accessor] = []
        self.images: list[gl.Image] = []

    def _view(self, payload: bytes, target: int | None = None) -> int:
        self.data += b"\0" * (-len(self.data) % 4)
        self.views.append(gl.BufferView(buffer=0, byteOffset=len(self.data), byteLength=len(payload), target=target))
        self.data += payload
        return len(self.views) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int, bounds: bool = False) -> int:
        array = np.ascontiguousarray(array)
        view = self._view(array.tobytes(), target)
        self.accessors.append(gl.Accessor(
            bufferView=view, componentType=_COMPONENT[array.dtype], count=array.shape[0], type=kind,
            min=array.min(axis=0).tolist() if bounds else None,
            max=array.max(axis=0).tolist() if bounds else None,
        ))
        return len(self.accessors) - 1

    def image(self, pixels: np.ndarray) -> int:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
        self.images.append(gl.Image(bufferView=self._view(buf.getvalue()), mimeType="image/png"))
        return len(self.images) - 1


def _read_accessor(gltf: gl.GLTF2, data: bytes, index: int) -> np.ndarray:
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    dtype = np.dtype(_NUMPY[acc.componentType])
    width = _WIDTH[acc.type]
    stride = view.byteStride or dtype.itemsize * width
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    rows = np.ndarray((acc.count, width), dtype=dtype, buffer=data, offset=start, strides=(stride, dtype.itemsize))
    return rows.copy()


def _read_image(gltf: gl.GLTF2, data: bytes, texture: int, mode: str) -> np.ndarray:
    image = gltf.images[gltf.textures[texture].source]
    view = gltf.bufferViews[image.bufferView]
    start = view.byteOffset or 0
    return np.array(Image.open(io.BytesIO(data[start:start + view.byteLength])).convert(mode))


def _check(mesh: TexturedMesh) -> None:
    v = mesh.positions.shape[0]
    if mesh.positions.shape != (v, 3) or mesh.normals.shape != (v, 3) or mesh.uvs.shape != (v, 2):
        raise ValueError("TexturedMesh positions, normals and uvs must be [V, 3], [V, 3], [V, 2]")
    if mesh.indices.ndim != 2 or mesh.indices.shape[1] != 3 or mesh.indices.shape[0] == 0:
        raise ValueError("TexturedMesh indices must be [F, 3] with F > 0")
    if mesh.indices.min() < 0 or mesh.indices.max() >= v:
        raise ValueError("TexturedMesh indices out of range")
    if mesh.base_color.ndim != 3 or mesh.base_color.shape[2] != 4 or mesh.base_color.dtype != np.uint8:
        raise ValueError("TexturedMesh base_color must be uint8 [T, T, 4]")
    if mesh.metallic_roughness.ndim != 3 or mesh.metallic_roughness.shape[2] != 3 \
            or mesh.metallic_roughness.dtype != np.uint8:
        raise ValueError("TexturedMesh metallic_roughness must be uint8 [T, T, 3]")
    if mesh.alpha_mode not in ("OPAQUE", "MASK", "BLEND"):
        raise ValueError(f"alpha_mode must be OPAQUE, MASK or BLEND, got {mesh.alpha_mode!r}")
