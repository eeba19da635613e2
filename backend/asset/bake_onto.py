"""Baking a texturing result (an O-Voxel of the caller's mesh) onto the caller's own triangles.

The reference's `postprocess_mesh` (texturing.md §1.3 step 10), without its faults: the mesh's own UVs are kept
when usable (non-degenerate, inside [0, 1]), otherwise the project's atlas unwraps it (uv.py); every texel a
triangle covers is lifted to its own surface point and the PBR voxels are sampled there by the reference's
trilinear rule (sampling.py; no projection: the voxels were built from this very surface); uncovered texels are
filled and the textures quantised as the image pipeline does (bake.py), alpha resolved the same way. The caller's
vertices and faces are never touched: the result is per-corner UVs for its faces, in its order, and the
textures. `textured_mesh` turns that into a mesh with per-vertex UVs for GLB export, splitting a vertex only where
its corners' UVs differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from backend.asset.bake import to_textures
from backend.asset.meshutil import edges_of
from backend.asset.normals import vertex_normals
from backend.asset.postprocess import BAKE, TEXTURES, UV, resolve_alpha_mode
from backend.asset.raster import rasterize
from backend.asset.sampling import sample_trilinear
from backend.asset.textured_mesh import AlphaMode, AssetSettings, TexturedMesh
from backend.asset.uv import unwrap
from backend.native import VoxelIndex
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.user_mesh import UserMesh
from backend.progress import ProgressCallback, ignore_progress

# The stages `bake_onto` reports: the asset step's own (postprocess.py) for the same work.
BAKE_STAGES = (UV, BAKE, TEXTURES)
UV_TOLERANCE = 1e-6  # UVs this far outside [0, 1] still count as inside (float noise of exporters)
MAX_DEGENERATE_UV_AREA = 0.1  # more than this share of the surface on zero-area UV triangles: UVs unusable


@dataclass
class BakedTextures:
    """Textures and UVs for the caller's own faces (its vertices unchanged)."""

    uvs: np.ndarray  # float32 [F, 3, 2] per-corner UVs in [0, 1], v up, for the caller's faces in their order
    uvs_kept: bool  # True: these are the caller's UVs; False: a new atlas
    base_color: np.ndarray  # uint8 [T, T, 4] RGBA, top row first
    metallic_roughness: np.ndarray  # uint8 [T, T, 3] (0, roughness, metallic)
    alpha_mode: AlphaMode
    alpha_cutoff: float
    double_sided: bool
    metadata: dict = field(default_factory=dict)


def uv_problem(mesh: UserMesh) -> str | None:
    """Why the mesh's UVs cannot be baked into (None when they can)."""
    if mesh.uvs is None:
        return "the mesh has no UVs"
    uv = mesh.uvs
    if not np.isfinite(uv).all():
        return "some UVs are not finite"
    if (uv < -UV_TOLERANCE).any() or (uv > 1 + UV_TOLERANCE).any():
        return "UVs reach outside [0, 1] (tiles or UDIMs)"
    p = mesh.positions.astype(np.float64)[mesh.faces]
    area = np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    uv_area = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    if (uv_area <= 0).all() or area[uv_area <= 0].sum() > MAX_DEGENERATE_UV_AREA * area.sum():
        return "the UVs are degenerate (faces collapse to zero area in UV space)"
    return None


def bake_onto(mesh: UserMesh, voxels: OVoxel, settings: AssetSettings, progress: ProgressCallback = ignore_progress,
              device: torch.device | str | None = None) -> BakedTextures:
    """Bake `voxels` (a texturing result for `mesh`) into textures on `mesh`'s UVs (or a new atlas).

    Uses `settings.texture_size`, `alpha_mode` and `alpha_cutoff`. `voxels.metadata` holds the normalisation
    the texturing pipeline applied (`center`, `scale`): voxel frame = (position - center) * scale.
    """
    report = progress
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    size = settings.texture_size
    positions = torch.from_numpy(mesh.positions.astype(np.float64)).to(device)
    faces = torch.from_numpy(mesh.faces).to(device)

    report(UV.name, 0, 1)
    problem = uv_problem(mesh)
    if problem is None:
        corner_uv = torch.from_numpy(mesh.uvs).to(device)
        pixels = torch.stack([corner_uv[..., 0] * size, (1 - corner_uv[..., 1]) * size], dim=-1).reshape(-1, 2)
        raster_faces = torch.arange(3 * faces.shape[0], device=device).reshape(-1, 3)
        corner_vertex = faces.reshape(-1)
        charts = None
    else:
        layout = unwrap(positions, faces, size)
        corner_uv = _corner_uvs(layout, faces, positions.shape[0])
        pixels, raster_faces, corner_vertex, charts = layout.pixels, layout.faces, layout.vertex, layout.num_charts
    report(UV.name, 1, 1)

    report(BAKE.name, 0, 1)
    raster = rasterize(pixels, raster_faces, size, size)
    covered = raster.face >= 0
    ys, xs = torch.nonzero(covered, as_tuple=True)
    corners = corner_vertex[raster_faces[raster.face[ys, xs]]]  # [M, 3] vertex of each corner
    points = (raster.bary[ys, xs].double().unsqueeze(2) * positions[corners]).sum(dim=1)
    center = torch.tensor(voxels.metadata["center"], dtype=torch.float64, device=device)
    grid = ((points - center) * voxels.metadata["scale"] + 0.5) * voxels.resolution
    attrs = torch.from_numpy(voxels.attrs).to(device)
    index = VoxelIndex(torch.from_numpy(voxels.coords).to(device))
    image = attrs.new_zeros(size, size, attrs.shape[1])
    image[ys, xs] = sample_trilinear(index, attrs, grid)
    report(BAKE.name, 1, 1)

    report(TEXTURES.name, 0, 1)
    textures = to_textures(image, covered)
    report(TEXTURES.name, 1, 1)
    return BakedTextures(
        uvs=corner_uv.float().cpu().numpy(),
        uvs_kept=problem is None,
        base_color=textures.base_color.cpu().numpy(),
        metallic_roughness=textures.metallic_roughness.cpu().numpy(),
        alpha_mode=resolve_alpha_mode(settings, textures.base_color, covered),
        alpha_cutoff=settings.alpha_cutoff,
        double_sided=bool((edges_of(faces, positions.shape[0]).count == 1).any()),
        metadata={"uvs": "kept" if problem is None else f"new atlas: {problem}", "charts": charts,
                  "coverage": float(covered.float().mean())},
    )


def _corner_uvs(layout, faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """float64 [F, 3, 2] per-corner UVs of an atlas for every input face. The atlas leaves out zero-area faces;
    their corners take a UV their vertex has elsewhere (they cover no texel either way)."""
    any_uv = torch.zeros(num_vertices, 2, dtype=torch.float64, device=faces.device)
    any_uv[layout.vertex] = layout.uv.double()
    out = any_uv[faces.long()]
    out[layout.source_face] = layout.uv.double()[layout.faces]
    return out


def textured_mesh(mesh: UserMesh, baked: BakedTextures) -> TexturedMesh:
    """The caller's mesh with the baked material and per-vertex UVs (Z-up frame, as the caller's positions).

    Vertex i keeps index i and its exact position, with the UV of its first corner; a corner whose UV differs
    from its vertex's gets a copy of the vertex appended (a UV seam). Faces keep their order."""
    faces = mesh.faces
    corner_vertex = faces.reshape(-1)
    corner_uv = baked.uvs.reshape(-1, 2)
    num = mesh.positions.shape[0]
    used, first = np.unique(corner_vertex, return_index=True)  # each used vertex's first corner
    uv = np.zeros((num, 2), dtype=np.float32)
    uv[used] = corner_uv[first]
    seam = (corner_uv != uv[corner_vertex]).any(axis=1)
    bits = corner_uv[seam].view(np.int32)
    key = np.stack([corner_vertex[seam], bits[:, 0], bits[:, 1]], axis=1)
    extra, slot = np.unique(key, axis=0, return_inverse=True)
    index = corner_vertex.copy()
    index[seam] = num + slot.reshape(-1)
    vertex = np.concatenate([np.arange(num), extra[:, 0]])
    positions = mesh.positions[vertex].astype(np.float32)
    normals = vertex_normals(torch.from_numpy(mesh.positions.astype(np.float64)), torch.from_numpy(faces))
    return TexturedMesh(
        positions=positions,
        indices=index.reshape(-1, 3).astype(np.int32),
        normals=normals[vertex].float().numpy(),
        uvs=np.concatenate([uv, extra[:, 1:].astype(np.int32).view(np.float32)]),
        base_color=baked.base_color,
        metallic_roughness=baked.metallic_roughness,
        alpha_mode=baked.alpha_mode,
        alpha_cutoff=baked.alpha_cutoff,
        double_sided=baked.double_sided,
        metadata=dict(baked.metadata),
    )
