"""The wire form of a finished job: a TexturedMesh becomes a `result` message (conventional array names and dtypes,
material facts in its metadata), and back, for clients that write files; a texture job's textures for the caller's
own mesh become one too (per-corner UVs and the textures; the caller keeps its geometry)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.asset.textured_mesh import TexturedMesh
from protocol import Result

if TYPE_CHECKING:  # (bake_onto loads torch; the server must not at import time)
    from backend.asset.bake_onto import BakedTextures

MESH_DTYPES = {"positions": np.float32, "indices": np.uint32, "normals": np.float32, "uvs": np.float32}
TEXTURE_NAMES = ("base_color", "metallic_roughness")
MATERIAL_KEYS = ("alpha_mode", "alpha_cutoff", "double_sided")


def result_message(job_id: str, mesh: TexturedMesh, metadata: dict[str, Any]) -> Result:
    """The wire form of a finished asset: conventional array names and dtypes, material facts in metadata."""
    arrays = {name: np.ascontiguousarray(getattr(mesh, name), dtype=dtype) for name, dtype in MESH_DTYPES.items()}
    textures = {name: np.ascontiguousarray(getattr(mesh, name), dtype=np.uint8) for name in TEXTURE_NAMES}
    facts = {key: getattr(mesh, key) for key in MATERIAL_KEYS}
    return Result(job_id, arrays, textures, plain({**metadata, **facts, "mesh": mesh.metadata}))


def texture_result_message(job_id: str, baked: BakedTextures, metadata: dict[str, Any]) -> Result:
    """A texture job's result: `mesh.uvs` float32 [3F, 2] per corner of the request's triangles (its own UVs when
    they were usable), the textures, and the material facts and UV origin (`uvs`: "kept" or why not) in metadata."""
    uvs = np.ascontiguousarray(baked.uvs.reshape(-1, 2), dtype=np.float32)
    textures = {name: np.ascontiguousarray(getattr(baked, name), dtype=np.uint8) for name in TEXTURE_NAMES}
    facts = {key: getattr(baked, key) for key in MATERIAL_KEYS}
    return Result(job_id, {"uvs": uvs}, textures, plain({**metadata, **facts, **baked.metadata}))


def textured_mesh_from_result(result: Result) -> TexturedMesh:
    """The TexturedMesh a Result carries (for GLB writing on the client side)."""
    meta = result.metadata
    return TexturedMesh(
        positions=result.mesh["positions"], indices=result.mesh["indices"].astype(np.int32),
        normals=result.mesh["normals"], uvs=result.mesh["uvs"], base_color=result.textures["base_color"],
        metallic_roughness=result.textures["metallic_roughness"],
        **{key: meta[key] for key in MATERIAL_KEYS if key in meta}, metadata=meta)


def plain(value: Any) -> Any:
    """A protocol value tree from metadata that may hold numpy scalars, tuples or non-finite floats."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
