"""Triangle mesh -> O-Voxel: the flexible dual grid (spec §7.1) and the 6 PBR attributes per voxel.

Follows the reference encoders (o-voxel `mesh_to_flexible_dual_grid`, `textured_mesh_to_volumetric_attr`):
- Geometry: the reference voxeliser itself, reproduced bit for bit (`voxelizer.py`: voxels around every grid
  edge the surface crosses, edge flags, and each voxel's dual vertex from its box-constrained QEF of crossing
  planes, face planes, boundary lines and a pull towards the mean crossing point).
- Attributes: every triangle that crosses an edge of a voxel adds one sample at the point of the triangle
  nearest the voxel centre; a voxel's attributes are the plain mean of the samples of the surface its dual
  vertex lies on: triangles whose planes pass within SURFACE_TOLERANCE of the nearest one's. (The reference
  averages every sample, so two parts sharing a voxel bleed into each other; it projects the centre onto the
  triangle's plane without clamping and weights by 1 - distance, i.e. ~1: a plain mean too.)
- Colour spaces follow glTF: base-colour textures are sRGB-encoded, base-colour factors and vertex colours are
  linear; their product is stored sRGB-encoded, as texture values are (and as the baked textures are read).
- Split weights: the reference encoder has none (its decoder learns them). We pick, per quad, the diagonal the
  reference's own mesh extraction prefers (the split whose two triangle normals differ least) and fit one
  positive weight per voxel so the decoder's rule w0*w2 > w1*w3 reproduces as many of those picks as possible.

Attributes are vectorised numpy over (triangle, voxel) samples, in voxel units (p + 0.5) * R and float64.
As in the reference, a grid edge the surface crosses twice (a sharp edge or a part thinner than a voxel) is
flagged like one crossed once, which keeps thin parts but can leave a few non-manifold or boundary edges in
the dual surface of a closed mesh there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from backend.ovoxel.dual_grid import dual_quads, flexible_dual_grid_to_mesh
from backend.ovoxel.nearest import closest_on_triangles
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.voxelizer import mesh_to_flexible_dual_grid

ProgressCallback = Callable[[str, int, int], None]
AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))
# A generic offset (world units) added to the vertices before voxelising so that no vertex, edge or face lies
# exactly on a grid line or plane (common for synthetic meshes and symmetric models). The reference voxeliser,
# given a surface on a grid plane, counts it on one side in some tests and on the other in others, which tears
# holes in the dual surface (our tests: a grid-aligned box, a slab thinner than a voxel, fins meeting on a grid
# line). 1e-6 is about 16 float32 ulps at the grid's far side and 1e-3 voxel at resolution 1024.
JITTER = np.array([0.7548776662, 0.5698402910, 0.4301597090]) * 1e-6


SURFACE_TOLERANCE = 0.2  # voxels: samples of one voxel whose planes are this much farther away are another surface


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, so compare/hash by identity
class Material:
    """glTF-style metal/rough material. Textures are uint8, top row first, sampled with v up (bilinear, repeat,
    mip-mapped to the voxel's footprint as the reference does). Defaults suit an untextured mesh."""

    base_color: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # RGBA factor, linear RGB (glTF)
    metallic: float = 0.0
    roughness: float = 1.0
    base_color_texture: np.ndarray | None = None  # [H, W, 4] RGBA (or [H, W, 3])
    metallic_roughness_texture: np.ndarray | None = None  # [H, W, 3]: G = roughness, B = metallic
    alpha_mode: Literal["OPAQUE", "MASK", "BLEND"] = "OPAQUE"  # OPAQUE ignores every alpha source
    alpha_cutoff: float = 0.5


@dataclass
class SurfaceMesh:
    """One part of the input: triangles in the O-Voxel frame (Z-up, inside [-0.5, 0.5]^3) with one material."""

    vertices: np.ndarray  # [V, 3] float
    faces: np.ndarray  # [F, 3] int
    uvs: np.ndarray | None = None  # [V, 2], v up; needed by the material's textures
    vertex_colors: np.ndarray | None = None  # [V, 3|4] in [0, 1], linear RGB (glTF COLOR_0), multiplies the
    # base colour (and alpha)
    material: Material = field(default_factory=Material)


@dataclass
class DualGrid:
    """The geometry half of an O-Voxel, rows sorted by (x, y, z)."""

    coords: np.ndarray  # int32 [N, 3]
    dual_vertices: np.ndarray  # float32 [N, 3], voxel units relative to the voxel's min corner, in [0, 1]
    intersected: np.ndarray  # bool [N, 3]
    split_weight: np.ndarray  # float32 [N, 1], > 0
    sample_pairs: tuple[np.ndarray, np.ndarray]  # (triangle, voxel row) pairs that attribute sampling uses


def encode_mesh(
    parts: SurfaceMesh | Sequence[SurfaceMesh],
    resolution: int,
    *,
    progress: ProgressCallback | None = None,
    metadata: dict | None = None,
) -> OVoxel:
    """Encode a (multi-part) mesh into an O-Voxel at `resolution`, with its decoded dual-grid mesh filled in."""
    parts = [parts] if isinstance(parts, SurfaceMesh) else list(parts)
    report = progress or (lambda stage, step, total: None)
    vertices, faces, part_of_face = _concatenate(parts)
    grid = mesh_to_dual_grid(vertices, faces, resolution, progress=report)
    report("attributes", 0, 1)
    attrs = _voxel_attributes(parts, vertices, faces, part_of_face, grid, resolution)
    report("attributes", 1, 1)
    vertices_out, faces_out = _dual_grid_mesh(grid.coords, grid.dual_vertices, grid.intersected, grid.split_weight,
                                              resolution)
    return OVoxel(coords=grid.coords, attrs=attrs, resolution=resolution, vertices=vertices_out, faces=faces_out,
                  metadata=dict(metadata or {}), dual_vertices=grid.dual_vertices, intersected=grid.intersected,
                  split_weight=grid.split_weight)


def decode_dual_grid(ovoxel: OVoxel) -> tuple[np.ndarray, np.ndarray]:
    """The dual-grid mesh of an O-Voxel that carries its dual grid (vertices [N, 3] float32, faces [F, 3] int32)."""
    if ovoxel.dual_vertices is None or ovoxel.intersected is None:
        raise ValueError("this O-Voxel has no dual grid (dual_vertices / intersected)")
    return _dual_grid_mesh(ovoxel.coords, ovoxel.dual_vertices, ovoxel.intersected, ovoxel.split_weight,
                           ovoxel.resolution)


def _dual_grid_mesh(coords: np.ndarray, dual: np.ndarray, intersected: np.ndarray, split: np.ndarray | None,
                    resolution: int) -> tuple[np.ndarray, np.ndarray]:
    weight = None if split is None else torch.from_numpy(split)
    v, f = flexible_dual_grid_to_mesh(torch.from_numpy(coords), torch.from_numpy(dual),
                                      torch.from_numpy(intersected), weight, AABB, resolution)
    return v.numpy(), f.numpy()


def normalize_to_unit_cube(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(vertices centred and scaled into [-0.5, 0.5]^3, centre, scale), as the reference prepares its data
    (bounding-box centre, longest side -> 0.99999 so no vertex lands on the grid's outer boundary)."""
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    center = (lo + hi) / 2
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise ValueError("the mesh has no extent (all vertices coincide, or some are not finite)")
    scale = 0.99999 / extent
    return (vertices - center) * scale, center, scale


def mesh_to_dual_grid(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int,
    *,
    progress: ProgressCallback | None = None,
) -> DualGrid:
    """Voxels, dual vertices, edge flags and split weights of a triangle mesh inside [-0.5, 0.5]^3.

    The reference voxeliser (`voxelizer.py`, bit for bit, with the reference's data-preparation weights) run on the
    vertices nudged by JITTER; rows are then sorted by (x, y, z) and the dual vertices clamped to their voxel, as
    the reference's training data stores them.
    (The texturing pipeline calls the voxeliser itself, without the nudge, to match the reference exactly.)
    """
    report = progress or (lambda stage, step, total: None)
    report("voxelize", 0, 1)
    nudged = (np.asarray(vertices, dtype=np.float64) + JITTER).astype(np.float32)
    grid = mesh_to_flexible_dual_grid(torch.from_numpy(nudged), torch.from_numpy(np.ascontiguousarray(faces)),
                                      resolution)
    report("voxelize", 1, 1)
    coords = grid.coords.long().numpy()
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0]))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    coords = coords[order]
    dual = grid.local().clamp(0, 1).numpy()[order]
    intersected = grid.intersected.numpy()[order]
    report("split_weights", 0, 1)
    split = _fit_split_weights(coords, dual.astype(np.float64), intersected)
    report("split_weights", 1, 1)
    tri, row = (x.numpy() for x in grid.crossing_pairs)
    return DualGrid(coords.astype(np.int32), dual, intersected, split.astype(np.float32), (tri, rank[row]))


def _fit_split_weights(coords: np.ndarray, dual: np.ndarray, intersected: np.ndarray, steps: int = 150) -> np.ndarray:
    """[N, 1] positive weights whose products pick, for as many quads as possible, the diagonal with the smaller
    angle between its two triangles (the reference encoder's own choice).

    log w is fitted by a squared hinge loss on l0 + l2 - l1 - l3 (sign = preferred diagonal, margin 1), each quad
    weighted by how much the two diagonals' angles differ; quads where they differ by less than 1e-6 rad are flat
    (either split gives the same surface) and left out, and voxels of no remaining quad keep weight 1.
    Adam with a hand-written gradient, over the voxels that matter only.
    """
    n = coords.shape[0]
    quads = dual_quads(torch.from_numpy(coords), torch.from_numpy(intersected))
    v = torch.from_numpy(coords + dual)[quads]  # [L, 4, 3]
    angle_02 = _angle(torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]),
                      torch.linalg.cross(v[:, 2] - v[:, 0], v[:, 3] - v[:, 0]))
    angle_13 = _angle(torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 3] - v[:, 0]),
                      torch.linalg.cross(v[:, 2] - v[:, 1], v[:, 3] - v[:, 1]))
    importance = (angle_02 - angle_13).abs()
    keep = (importance > 1e-6).numpy()
    weight = np.ones((n, 1))
    if not keep.any():
        return weight
    used, local = np.unique(quads.numpy()[keep], return_inverse=True)
    local = local.reshape(-1, 4)
    importance = importance.numpy()[keep]
    signed = np.array([1.0, -1.0, 1.0, -1.0]) * np.where(angle_02 <= angle_13, 1.0, -1.0)[keep][:, None]
    log_w, m1, m2 = np.zeros(used.size), np.zeros(used.size), np.zeros(used.size)
    beta1, beta2, lr = 0.9, 0.999, 0.1
    for step in range(1, steps + 1):
        slack = np.maximum(1 - (log_w[local] * signed).sum(axis=1), 0)
        grad = np.bincount(local.ravel(), ((-2 * importance * slack)[:, None] * signed).ravel(), minlength=used.size)
        grad += 2e-4 * log_w
        m1 = beta1 * m1 + (1 - beta1) * grad
        m2 = beta2 * m2 + (1 - beta2) * grad * grad
        log_w -= lr * (m1 / (1 - beta1**step)) / (np.sqrt(m2 / (1 - beta2**step)) + 1e-8)
    weight[used, 0] = np.exp(np.clip(log_w, -20, 20))
    return weight


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors; a zero vector counts as perpendicular to everything (as Eigen's normalized())."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp_min(1e-300)
    return torch.acos(cos.clamp(-1, 1))


# ----------------------------------------------------------------------------------------------------------------
# Attributes


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (IEC 61966-2-1)."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Linear values in [0, 1] -> sRGB-encoded (IEC 61966-2-1)."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def _voxel_attributes(parts: list[SurfaceMesh], vertices: np.ndarray, faces: np.ndarray, part_of_face: np.ndarray,
                      grid: DualGrid, resolution: int) -> np.ndarray:
    """[N, 6] mean of the (triangle, voxel) samples of the surface through each voxel's dual vertex: base colour,
    metallic, roughness, alpha."""
    tri_id, row = grid.sample_pairs
    n = grid.coords.shape[0]
    p = (vertices.astype(np.float64) + 0.5) * resolution
    corners = p[faces[tri_id]]  # [M, 3, 3]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    length = np.linalg.norm(normal, axis=1)
    dual = grid.coords[row].astype(np.float64) + grid.dual_vertices[row]
    plane_distance = np.where(length > 0, np.abs(((dual - corners[:, 0]) * normal).sum(axis=1))
                              / np.maximum(length, 1e-300), np.inf)
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, row, plane_distance)
    own = plane_distance <= nearest[row] + SURFACE_TOLERANCE
    own |= ~np.isfinite(nearest[row])  # a voxel crossed by degenerate triangles only keeps them all
    tri_id, row, corners = tri_id[own], row[own], corners[own]
    centre = grid.coords[row].astype(np.float64) + 0.5
    bary = closest_on_triangles(torch.from_numpy(centre), *(torch.from_numpy(corners[:, k]) for k in range(3)))
    bary = bary.numpy()
    samples = np.empty((tri_id.size, 6))
    offset = 0
    for index, part in enumerate(parts):
        sel = np.nonzero(part_of_face[tri_id] == index)[0]
        local = faces[tri_id[sel]] - offset
        samples[sel] = _sample_material(part, local, bary[sel], corners[sel])
        offset += part.vertices.shape[0]
    total = _scatter(row, samples, n)
    return (total / np.maximum(np.bincount(row, minlength=n), 1)[:, None]).astype(np.float32)


def _sample_material(part: SurfaceMesh, corners: np.ndarray, bary: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """[M, 6] attributes of one part at barycentric points of its triangles (local vertex indices `corners`),
    base colour sRGB-encoded."""
    mat = part.material
    out = np.empty((bary.shape[0], 6))
    rgba = np.broadcast_to(np.asarray(mat.base_color, dtype=np.float64), (bary.shape[0], 4)).copy()  # linear
    metal = np.full(bary.shape[0], float(mat.metallic))
    rough = np.full(bary.shape[0], float(mat.roughness))
    textured = mat.base_color_texture is not None or mat.metallic_roughness_texture is not None
    if textured:
        if part.uvs is None:
            raise ValueError("a part has a texture but no UVs")
        uv_tri = np.asarray(part.uvs, dtype=np.float64)[corners]  # [M, 3, 2]
        uv = (bary[..., None] * uv_tri).sum(axis=1)
        footprint = _uv_footprint(tri, uv_tri)
        if mat.base_color_texture is not None:
            texel = _MipTexture(mat.base_color_texture).sample(uv, footprint)
            rgba[:, :3] *= srgb_to_linear(texel[:, :3])
            rgba[:, 3] *= texel[:, 3]
        if mat.metallic_roughness_texture is not None:
            mr = _MipTexture(mat.metallic_roughness_texture).sample(uv, footprint)
            rough *= mr[:, 1]
            metal *= mr[:, 2]
    if part.vertex_colors is not None:
        colors = np.asarray(part.vertex_colors, dtype=np.float64)
        if colors.shape[1] == 3:
            colors = np.concatenate([colors, np.ones((colors.shape[0], 1))], axis=1)
        rgba *= (bary[..., None] * colors[corners]).sum(axis=1)
    alpha = rgba[:, 3]
    if mat.alpha_mode == "OPAQUE":
        alpha = np.ones_like(alpha)
    elif mat.alpha_mode == "MASK":
        alpha = (alpha >= mat.alpha_cutoff).astype(np.float64)
    out[:, :3], out[:, 3], out[:, 4], out[:, 5] = linear_to_srgb(rgba[:, :3]), metal, rough, alpha
    return out


def _uv_footprint(tri: np.ndarray, uv_tri: np.ndarray) -> np.ndarray:
    """[M] size of one voxel in UV units on each triangle (the reference's mip length); 0 where UVs degenerate."""
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    d1, d2 = uv_tri[:, 1] - uv_tri[:, 0], uv_tri[:, 2] - uv_tri[:, 0]
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    t = np.linalg.norm(d2[:, 1:2] * e1 - d1[:, 1:2] * e2, axis=1)
    b = np.linalg.norm(d1[:, 0:1] * e2 - d2[:, 0:1] * e1, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.abs(det) / np.sqrt(t * b)
    return np.where((np.abs(det) >= 1e-6) & np.isfinite(size), size, 0.0)


class _MipTexture:
    """A texture as a box-filtered mip pyramid (square, power-of-two side, as the reference requires), sampled
    bilinearly with repeat wrapping and blended between the two levels around log2(footprint * side)."""

    def __init__(self, image: np.ndarray) -> None:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"textures must be uint8, got {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        longest = max(image.shape[:2])
        lower = 1 << (longest.bit_length() - 1)
        side = lower if longest - lower <= 2 * lower - longest else 2 * lower  # nearest power of two
        if image.shape[0] != side or image.shape[1] != side:
            pil = Image.fromarray(image.squeeze(-1) if image.shape[2] == 1 else image)
            image = np.asarray(pil.resize((side, side), Image.LANCZOS)).reshape(side, side, -1)
        level = image.astype(np.float64) / 255.0
        self.levels = [level]
        while level.shape[0] > 1:
            level = 0.25 * (level[0::2, 0::2] + level[1::2, 0::2] + level[0::2, 1::2] + level[1::2, 1::2])
            self.levels.append(level)
        if image.shape[2] == 3:  # RGB base colour: opaque
            self.levels = [np.concatenate([lv, np.ones(lv.shape[:2] + (1,))], axis=2) for lv in self.levels]

    def sample(self, uv: np.ndarray, footprint: np.ndarray) -> np.ndarray:
        side = self.levels[0].shape[0]
        with np.errstate(divide="ignore"):
            lod = np.log2(footprint * side)
        lod = np.clip(np.nan_to_num(lod, nan=0.0, neginf=0.0), 0, len(self.levels) - 1)
        low = np.floor(lod).astype(np.int64)
        frac = (lod - low)[:, None]
        out = np.empty((uv.shape[0], self.levels[0].shape[2]))
        for lv in np.unique(low):
            sel = low == lv
            a = _bilinear(self.levels[lv], uv[sel])
            b = _bilinear(self.levels[min(lv + 1, len(self.levels) - 1)], uv[sel])
            out[sel] = (1 - frac[sel]) * a + frac[sel] * b
        return out


def _bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with repeat wrapping; v up, row 0 at the top (texel row r holds v = 1 - (r + .5) / H)."""
    h, w = image.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    xa, xb, ya, yb = x0 % w, (x0 + 1) % w, y0 % h, (y0 + 1) % h
    return ((1 - fx) * (1 - fy) * image[ya, xa] + fx * (1 - fy) * image[ya, xb]
            + (1 - fx) * fy * image[yb, xa] + fx * fy * image[yb, xb])




# ----------------------------------------------------------------------------------------------------------------
# Small array utilities


def _concatenate(parts: list[SurfaceMesh]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        raise ValueError("no mesh parts to encode")
    vertices, faces, owner, offset = [], [], [], 0
    for index, part in enumerate(parts):
        v = np.asarray(part.vertices, dtype=np.float64)
        f = np.asarray(part.faces, dtype=np.int64)
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"part {index}: vertices must be [V, 3] and faces [F, 3]")
        if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
            raise ValueError(f"part {index}: face indices out of range")
        if not np.isfinite(v).all():
            raise ValueError(f"part {index}: vertices are not all finite")
        if v.size and (np.abs(v) > 0.5).any():
            raise ValueError(f"part {index}: vertices must lie inside [-0.5, 0.5]^3 (normalise the mesh first)")
        for name, arr, width in (("uvs", part.uvs, (2,)), ("vertex_colors", part.vertex_colors, (3, 4))):
            if arr is not None and (np.shape(arr)[0] != v.shape[0] or np.shape(arr)[1] not in width):
                raise ValueError(f"part {index}: {name} must have one row per vertex")
        vertices.append(v)
        faces.append(f + offset)
        owner.append(np.full(f.shape[0], index))
        offset += v.shape[0]
    faces_all = np.concatenate(faces)
    if faces_all.shape[0] == 0:
        raise ValueError("the mesh has no faces")
    return np.concatenate(vertices), faces_all, np.concatenate(owner)


def _scatter(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """[n, K] row sums of values [M, K] grouped by index."""
    return np.stack([np.bincount(index, values[:, k], minlength=n) for k in range(values.shape[1])], axis=1)
