"""Texture Selected, free of bpy: the texture request made of an object's evaluated mesh, the rule for whether its
UV map can carry the textures, and the reader that checks the backend's answer against what was sent.

The backend keeps the sent UVs when they are usable (non-degenerate, inside [0, 1]: backend/asset/bake_onto.py
`uv_problem`, which tests/addon_core checks this rule against) and otherwise bakes into an atlas of its own, which
would not fit the object's UV map. So the add-on sends only UVs this rule accepts: the object's own map, or one it
made for the purpose (named `UV_MAP_NAME`); and it refuses a result baked into other UVs (core/result.py).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..protocol import Result, Texture
from .errors import AddonError
from .result import SurfaceTextures, surface_textures

UV_MAP_NAME = "TRELLIS.2"  # the UV map the add-on makes when the object has no usable one
UV_TOLERANCE = 1e-6  # UVs this far outside [0, 1] still count as inside (exporters' float noise)
MAX_DEGENERATE_UV_AREA = 0.1  # share of the surface that may sit on zero-area UV triangles


def check_surface(label: str, positions: np.ndarray, triangles: np.ndarray) -> None:
    """An AddonError naming the object `label` when its evaluated mesh cannot be textured at all."""
    if len(triangles) == 0:
        raise AddonError(f"{label} has no faces (after its modifiers)", "Select a mesh object with faces.")
    if not np.isfinite(positions).all():
        raise AddonError(f"{label} has vertex positions that are NaN or infinite", "Fix or delete those vertices.")
    if not (_areas(positions, triangles) > 0).any():
        raise AddonError(f"Every face of {label} has zero area", "Select a mesh object with real surface area.")


def uv_problem(positions: np.ndarray, triangles: np.ndarray, corner_uvs: np.ndarray) -> str | None:
    """Why per-corner UVs [3F, 2] of the triangles [F, 3] over `positions` cannot carry the textures (None: they
    can): not finite, outside [0, 1] (tiles, UDIMs), or so many faces collapsed in UV space that the texture
    would miss a real part of the surface."""
    uv = np.asarray(corner_uvs, dtype=np.float64).reshape(-1, 3, 2)
    if not np.isfinite(uv).all():
        return "some UVs are not finite"
    if uv.min(initial=0.0) < -UV_TOLERANCE or uv.max(initial=1.0) > 1 + UV_TOLERANCE:
        return "its UVs reach outside [0, 1] (tiles or UDIMs)"
    e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    collapsed = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) <= 0
    area = _areas(positions, triangles)
    if collapsed.all() or area[collapsed].sum() > MAX_DEGENERATE_UV_AREA * area.sum():
        return "its faces collapse to zero area in UV space"
    return None


def _areas(positions: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    p = np.asarray(positions, dtype=np.float64)[triangles]
    return np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)


def texture_request(image: bytes, positions: np.ndarray, triangles: np.ndarray, corner_uvs: np.ndarray,
                    settings: Mapping[str, Any]) -> Texture:
    """The wire request: positions float32 [N, 3], indices uint32 [F, 3], uvs float32 [3F, 2] per corner."""
    mesh = {"positions": np.ascontiguousarray(positions, dtype=np.float32).reshape(-1, 3),
            "indices": np.ascontiguousarray(triangles, dtype=np.uint32).reshape(-1, 3),
            "uvs": np.ascontiguousarray(corner_uvs, dtype=np.float32).reshape(-1, 2)}
    if len(mesh["uvs"]) != 3 * len(mesh["indices"]):
        raise ValueError(f"{len(mesh['uvs'])} UVs for {len(mesh['indices'])} triangles: one per corner is needed")
    return Texture(image, mesh, dict(settings))


def result_reader(request: Texture) -> Callable[[Result], SurfaceTextures]:
    """The RemoteJob `read_result` of a texture job: its Result checked against the request's UVs."""
    sent = request.mesh["uvs"]
    return lambda result: surface_textures(result.mesh, result.textures, result.metadata, sent)
