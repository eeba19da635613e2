"""A caller's own triangle mesh (the texturing pipeline's input), checked once before anything uses it.

Positions are kept exactly as given: the texturing result goes back onto these vertices, so they are never
rewritten. UVs, when given, are per face corner (the general form: Blender's loops; per-vertex UVs expand to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.errors import InvalidInput

MAX_FACES = 5_000_000
MAX_VERTICES = 5_000_000


class MeshInputError(InvalidInput):
    """A mesh that cannot be textured: `message` names the problem, `hint` the fix."""

    code = "invalid_mesh"


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class UserMesh:
    positions: np.ndarray  # float [V, 3], as given (any frame, any units; Z-up for the texturing pipeline)
    faces: np.ndarray  # int64 [F, 3]
    uvs: np.ndarray | None = None  # float64 [F, 3, 2] per-corner UVs, v up (may be unusable: see bake_onto)

    @classmethod
    def from_request(cls, arrays: dict[str, np.ndarray]) -> UserMesh:
        """The mesh of a texture request (protocol: `positions` [N, 3], `indices` [F, 3], optional per-corner
        `uvs` [3F, 2]), checked."""
        missing = [name for name in ("positions", "indices") if name not in arrays]
        if missing:
            raise MeshInputError(f"the mesh lacks its {' and '.join(missing)} array", "send positions and indices")
        faces = np.asarray(arrays["indices"])
        uvs = arrays.get("uvs")
        if uvs is not None and faces.ndim == 2 and faces.shape[0]:  # (bad or no faces: `checked` names them)
            uvs = np.asarray(uvs)
            if uvs.ndim != 2 or uvs.shape != (3 * faces.shape[0], 2):
                raise MeshInputError(f"uvs must be [3F, 2] = [{3 * faces.shape[0]}, 2] (one per face corner), got "
                                     f"{list(uvs.shape)}", "send one (u, v) pair per corner of each triangle")
            uvs = uvs.reshape(-1, 3, 2)
        return cls.checked(arrays["positions"], faces, uvs)

    @classmethod
    def checked(cls, positions: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None,
                max_faces: int = MAX_FACES, max_vertices: int = MAX_VERTICES) -> UserMesh:
        """Validate untrusted arrays. `uvs` may be per corner [F, 3, 2] or per vertex [V, 2]."""
        positions = np.asarray(positions)
        faces = np.asarray(faces)
        if positions.ndim != 2 or positions.shape[1] != 3 or not np.issubdtype(positions.dtype, np.floating):
            raise MeshInputError(f"vertex positions must be a float [V, 3] array, got {positions.dtype} "
                                 f"{list(positions.shape)}", "send one (x, y, z) row per vertex")
        if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
            raise MeshInputError(f"faces must be an integer [F, 3] array, got {faces.dtype} {list(faces.shape)}",
                                 "triangulate the mesh and send three vertex indices per face")
        if positions.shape[0] == 0 or faces.shape[0] == 0:
            raise MeshInputError(f"the mesh is empty ({positions.shape[0]} vertices, {faces.shape[0]} faces)",
                                 "select an object with at least one face")
        if faces.shape[0] > max_faces or positions.shape[0] > max_vertices:
            raise MeshInputError(f"the mesh is too large ({faces.shape[0]} faces, {positions.shape[0]} vertices; "
                                 f"the limit is {max_faces} faces and {max_vertices} vertices)",
                                 "decimate it first (e.g. Blender's Decimate modifier)")
        if not np.isfinite(positions).all():
            raise MeshInputError(f"{int((~np.isfinite(positions)).any(axis=1).sum())} vertex positions are not "
                                 "finite (NaN or infinity)", "fix or delete those vertices")
        if faces.min() < 0 or faces.max() >= positions.shape[0]:
            raise MeshInputError(f"face indices must lie in [0, {positions.shape[0]}), found {int(faces.min())}.."
                                 f"{int(faces.max())}", "send faces that index the vertex array")
        faces = faces.astype(np.int64)
        corners = positions.astype(np.float64)[faces]
        area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
        if not (area > 0).any():
            raise MeshInputError("every face is degenerate (zero area)", "send a mesh with real surface area")
        return cls(positions, faces, None if uvs is None else _corner_uvs(np.asarray(uvs), positions, faces))


def _corner_uvs(uvs: np.ndarray, positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    if uvs.shape == (faces.shape[0], 3, 2):
        out = uvs
    elif uvs.shape == (positions.shape[0], 2):
        out = uvs[faces]
    else:
        raise MeshInputError(f"UVs must be per face corner [{faces.shape[0]}, 3, 2] or per vertex "
                             f"[{positions.shape[0]}, 2], got {list(uvs.shape)}", "send one UV pair per corner")
    if not np.issubdtype(out.dtype, np.number):
        raise MeshInputError(f"UVs must be numbers, got {out.dtype}", "send float UVs")
    return out.astype(np.float64)
