"""A backend Result checked and converted into exactly the arrays Blender's `foreach_set` wants.

Conventions (backend/asset/textured_mesh.py): positions and normals Z-up (Blender's frame), float32 [V, 3];
indices [F, 3] counter-clockwise; UVs per vertex [V, 2] with v up; textures top row first, `base_color` RGBA
(alpha = opacity), `metallic_roughness` RGB with G = roughness, B = metallic. Blender wants per-corner UVs and
image pixels bottom row first as float RGBA, which is what `MeshData` holds. A result that breaks the contract is
refused here with an AddonError, before any Blender data is made. Degenerate triangles (a vertex used twice), which
Blender's mesh code does not expect, are dropped.

A texture job's result (`surface_textures`) carries no mesh of its own: only `uvs` float32 [3F, 2], the UVs its
textures use per corner of the request's triangles, which must be the ones the add-on sent (it sends only UVs the
backend keeps, core/texturing.py), and the same textures and material metadata as a generated asset (`Material`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import AddonError

ALPHA_MODES = ("OPAQUE", "MASK", "BLEND")
RETURNED_UV_TOLERANCE = 1e-6  # how far returned UVs may be from the sent ones (the backend returns them as sent)
_HINT = "The backend sent a result this add-on cannot read: install the add-on and backend from the same release."


@dataclass(frozen=True)
class Texture:
    width: int
    height: int
    pixels: np.ndarray  # float32 [H * W * 4], RGBA in [0, 1], bottom row first (Blender's Image.pixels order)


@dataclass(frozen=True)
class Material:
    """A result's PBR textures, as Blender pixels, and how its alpha becomes transparency."""

    base_color: Texture
    metallic_roughness: Texture
    alpha_mode: str = "OPAQUE"
    alpha_cutoff: float = 0.5
    double_sided: bool = False
    # Blender's sorted (Blended) transparency only when the request asked for BLEND itself; otherwise Dithered,
    # which never sorts (no self-overlap flicker, no wrong order with other transparent objects).
    sorted_blend: bool = False


@dataclass(frozen=True)
class MeshData:
    positions: np.ndarray  # float32 [V, 3]
    corner_verts: np.ndarray  # int32 [3F]: the vertex of each face corner
    corner_uvs: np.ndarray  # float32 [3F, 2]
    normals: np.ndarray  # float32 [V, 3], unit length
    material: Material
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def face_count(self) -> int:
        return len(self.corner_verts) // 3


@dataclass(frozen=True)
class SurfaceTextures:
    """A texture job's result: the material for the object's own surface, baked into the UVs that were sent."""

    material: Material
    metadata: dict[str, Any] = field(default_factory=dict)


def _array(arrays: dict[str, np.ndarray], group: str, name: str, kinds: str, ndim: int, last: int | None) -> np.ndarray:
    if name not in arrays:
        raise AddonError(f"The result has no {group} array {name!r} (it has {sorted(arrays)})", _HINT)
    a = arrays[name]
    if a.dtype.kind not in kinds or a.ndim != ndim or (last is not None and a.shape[-1] != last):
        raise AddonError(f"The result's {group} array {name!r} is {a.dtype}{list(a.shape)}, not the expected "
                         f"[..., {last}] of kind {kinds!r}", _HINT)
    return a


def texture_pixels(texels: np.ndarray) -> Texture:
    """uint8 [H, W, 3|4] top row first -> Blender float RGBA bottom row first (opaque alpha added for RGB)."""
    h, w, c = texels.shape
    rgba = np.empty((h, w, 4), dtype=np.float32)
    np.multiply(texels[::-1], np.float32(1 / 255), out=rgba[..., :c])
    if c == 3:
        rgba[..., 3] = 1.0
    return Texture(w, h, rgba.reshape(-1))


def material(textures: dict[str, np.ndarray], metadata: dict[str, Any]) -> Material:
    """Check a result's textures and material metadata against the contract and convert them."""
    base = _array(textures, "texture", "base_color", "u", 3, 4)
    mr = _array(textures, "texture", "metallic_roughness", "u", 3, 3)
    if base.dtype != np.uint8 or mr.dtype != np.uint8 or 0 in base.shape or 0 in mr.shape:
        raise AddonError("The result's textures must be non-empty uint8 images", _HINT)
    alpha_mode = metadata.get("alpha_mode", "OPAQUE")
    cutoff = metadata.get("alpha_cutoff", 0.5)
    double_sided = metadata.get("double_sided", False)
    if alpha_mode not in ALPHA_MODES or not isinstance(cutoff, (int, float)) or not isinstance(double_sided, bool):
        raise AddonError(f"The result's material metadata is invalid: alpha_mode={alpha_mode!r}, "
                         f"alpha_cutoff={cutoff!r}, double_sided={double_sided!r}", _HINT)
    settings = metadata.get("settings")
    asked_blend = isinstance(settings, dict) and settings.get("alpha_mode") == "BLEND"
    return Material(texture_pixels(base), texture_pixels(mr), alpha_mode, float(cutoff), double_sided,
                    sorted_blend=asked_blend and alpha_mode == "BLEND")


def mesh_data(mesh: dict[str, np.ndarray], textures: dict[str, np.ndarray], metadata: dict[str, Any]) -> MeshData:
    """Check a result's arrays and metadata against the contract and convert them; AddonError if they break it."""
    positions = _array(mesh, "mesh", "positions", "f", 2, 3)
    indices = _array(mesh, "mesh", "indices", "iu", 2, 3)
    normals = _array(mesh, "mesh", "normals", "f", 2, 3)
    uvs = _array(mesh, "mesh", "uvs", "f", 2, 2)
    v = len(positions)
    if len(normals) != v or len(uvs) != v:
        raise AddonError(f"The result has {v} positions but {len(normals)} normals and {len(uvs)} UVs", _HINT)
    if len(indices) and (indices.min() < 0 or indices.max() >= v):
        raise AddonError(f"The result's indices reach outside its {v} vertices", _HINT)
    tris = indices.astype(np.int32)
    tris = tris[(tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])]
    if len(tris) == 0:
        raise AddonError("The backend produced an empty mesh",
                         "Try another seed, or an image whose subject stands clearly apart from the background.")
    if not (np.isfinite(positions).all() and np.isfinite(normals).all() and np.isfinite(uvs).all()):
        raise AddonError("The result's positions, normals or UVs contain NaN or infinity", _HINT)
    corner_verts = tris.reshape(-1)
    return MeshData(
        positions=np.ascontiguousarray(positions, dtype=np.float32),
        corner_verts=corner_verts,
        corner_uvs=np.ascontiguousarray(uvs, dtype=np.float32)[corner_verts],
        normals=np.ascontiguousarray(normals, dtype=np.float32),
        material=material(textures, metadata),
        metadata=dict(metadata),
    )


def surface_textures(mesh: dict[str, np.ndarray], textures: dict[str, np.ndarray], metadata: dict[str, Any],
                     sent_uvs: np.ndarray) -> SurfaceTextures:
    """Check a texture job's result against the request's per-corner UVs `sent_uvs` [3F, 2] and convert it.
    Textures baked into other UVs (a new atlas) would not fit the object's UV map, so they are refused."""
    uvs = _array(mesh, "mesh", "uvs", "f", 2, 2)
    if uvs.shape != sent_uvs.shape:
        raise AddonError(f"The result has UVs for {len(uvs)} face corners, the request had {len(sent_uvs)}", _HINT)
    said = metadata.get("uvs", "kept")
    if not isinstance(said, str):
        raise AddonError(f"The result's metadata 'uvs' is {said!r}, not a text", _HINT)
    if not (np.isfinite(uvs).all() and np.allclose(uvs, sent_uvs, rtol=0.0, atol=RETURNED_UV_TOLERANCE)):
        raise AddonError(f"The backend baked the textures into UVs of its own ({said}), not the object's UV map",
                         "Give the object a UV map inside [0, 1] whose faces do not collapse (UV > Smart UV Project), "
                         "or remove its UV maps so the add-on makes one.")
    return SurfaceTextures(material(textures, metadata), dict(metadata))
