"""Triangle mesh -> O-Voxel: the flexible dual grid (spec §7.1) and the 6 PBR attributes per voxel.

Follows the reference encoders (o-voxel `mesh_to_flexible_dual_grid`, `textured_mesh_to_volumetric_attr`):
- Voxels are the 4 cells around every grid edge the surface crosses; the crossing sets the edge flag on the cell
  whose upper corner carries that edge. A surface piece that crosses no grid edge adds no voxel.
- Each voxel's dual vertex minimises a QEF, clamped to the voxel: the planes of the triangles crossing its edges
  (once per crossing) and of the triangles overlapping it (face term), the lines of open boundary edges through
  it (boundary term), and a pull towards the mean crossing point (regularisation, times the crossing count).
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

Everything is vectorised numpy over triangles x grid lines / cells; work is done in voxel units (p + 0.5) * R,
in float64, so the voxel of a point is floor(p) and its box is [c, c + 1].
As in the reference, a grid edge the surface crosses twice (a sharp edge or a part thinner than a voxel) is
flagged like one crossed once, which keeps thin parts but can leave a few non-manifold or boundary edges in
the dual surface of a closed mesh there; smooth closed meshes decode closed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from backend.ovoxel.dual_grid import dual_quads, flexible_dual_grid_to_mesh
from backend.native import VoxelIndex
from backend.ovoxel.nearest import closest_on_triangles
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.segments import expand_segments

ProgressCallback = Callable[[str, int, int], None]
AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))
CHUNK = 1 << 22  # candidate (triangle, cell) pairs handled at once; bounds peak memory to a few hundred MB
# A generic offset (voxel units) added to the surface so that no vertex, edge or face lies exactly on a grid
# line or plane (common for synthetic meshes and symmetric models): a surface on a grid plane would otherwise be
# counted on one side by some tests and on the other by others, which tears holes in the dual surface.
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
    face_weight: float = 1.0,
    boundary_weight: float = 0.2,
    regularization_weight: float = 1e-2,
    progress: ProgressCallback | None = None,
    metadata: dict | None = None,
) -> OVoxel:
    """Encode a (multi-part) mesh into an O-Voxel at `resolution`, with its decoded dual-grid mesh filled in.

    Weights default to the reference's data-preparation values (face 1.0, boundary 0.2, regularisation 1e-2).
    """
    parts = [parts] if isinstance(parts, SurfaceMesh) else list(parts)
    report = progress or (lambda stage, step, total: None)
    vertices, faces, part_of_face = _concatenate(parts)
    grid = mesh_to_dual_grid(vertices, faces, resolution, face_weight=face_weight, boundary_weight=boundary_weight,
                             regularization_weight=regularization_weight, progress=report)
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
    face_weight: float = 1.0,
    boundary_weight: float = 0.2,
    regularization_weight: float = 1e-2,
    progress: ProgressCallback | None = None,
) -> DualGrid:
    """Voxels, dual vertices, edge flags and split weights of a triangle mesh inside [-0.5, 0.5]^3."""
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    if regularization_weight <= 0:
        raise ValueError("regularization_weight must be > 0 (it makes every voxel's QEF well-posed)")
    report = progress or (lambda stage, step, total: None)
    p = (vertices.astype(np.float32).astype(np.float64) + 0.5) * resolution + JITTER
    tri = p[faces]  # [F, 3, 3]
    planes = _planes(tri)

    report("voxelize", 0, 3)
    cross = _edge_crossings(tri, resolution)
    if cross.tri.size == 0:
        raise ValueError(f"the surface crosses no edge of the {resolution}^3 grid; nothing to encode")
    # The 4 cells around each crossed edge: lower cell + (0|1 on the two other axes).
    around = np.array([[(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)], [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)],
                       [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]])
    cells = cross.lower[:, None, :] + around[cross.axis]  # [C, 4, 3]
    keys = _keys(cells.reshape(-1, 3), resolution)
    voxel_keys, row = np.unique(keys, return_inverse=True)
    n = voxel_keys.size
    coords = np.stack(np.unravel_index(voxel_keys, (resolution,) * 3), axis=1)
    crossing_row = row.reshape(-1, 4)
    flagged = crossing_row[:, 0]
    intersected = np.zeros((n, 3), dtype=bool)
    intersected[flagged, cross.axis] = True
    tri_of = np.repeat(cross.tri, 4)
    point_sum = _scatter(row, np.repeat(cross.point, 4, axis=0), n)
    count = np.bincount(row, minlength=n).astype(np.float64)
    qef = _scatter(row, _plane_qef(planes[tri_of]), n)

    report("voxelize", 1, 3)
    index = VoxelIndex(torch.from_numpy(coords))
    if face_weight > 0:
        f_tri, f_cell = _face_cell_pairs(tri, planes, resolution)
        f_row = index.lookup(torch.from_numpy(f_cell)).numpy()
        hit = f_row >= 0
        qef += face_weight * _scatter(f_row[hit], _plane_qef(planes[f_tri[hit]]), n)
    report("voxelize", 2, 3)
    if boundary_weight > 0:
        seg = _boundary_segments(p, faces)
        b_seg, b_cell = _segment_cells(seg, resolution)
        b_row = index.lookup(torch.from_numpy(b_cell)).numpy()
        hit = b_row >= 0
        qef += boundary_weight * _scatter(b_row[hit], _line_qef(seg)[b_seg[hit]], n)
    report("voxelize", 3, 3)

    report("dual_vertices", 0, 1)
    mean = point_sum / count[:, None]
    qef += regularization_weight * count[:, None] * _point_qef(mean)
    dual = solve_box_qef(qef.reshape(n, 4, 4), coords.astype(np.float64)) - coords
    report("dual_vertices", 1, 1)

    report("split_weights", 0, 1)
    split = _fit_split_weights(coords, dual, intersected)
    report("split_weights", 1, 1)
    pairs = np.unique(tri_of.astype(np.int64) * n + row)
    return DualGrid(coords.astype(np.int32), dual.astype(np.float32), intersected, split.astype(np.float32),
                    (pairs // n, pairs % n))


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers


@dataclass
class _Crossings:
    tri: np.ndarray  # [C] triangle index
    axis: np.ndarray  # [C] axis of the crossed grid edge
    lower: np.ndarray  # [C, 3] the cell whose upper corner (in the other two axes) carries the edge
    point: np.ndarray  # [C, 3] crossing point, voxel units


def _edge_crossings(tri: np.ndarray, resolution: int) -> _Crossings:
    """Every crossing of a triangle with an interior grid line, per axis.

    A grid line parallel to axis a is a lattice point (I, J) in the plane of the two other axes; it crosses a
    triangle when the point lies in the triangle's projection. Each edge's test is evaluated on its endpoints in
    a canonical order, so the triangles on both sides of a shared edge compute bit-identical values and a line
    near that edge is counted by exactly one of them (no spurious hole in the dual surface). Exact ties, which
    JITTER makes practically impossible, are broken as if the line were nudged by (eps, eps^2).
    """
    out: list[tuple[np.ndarray, ...]] = []
    for axis in range(3):
        a0, a1 = (axis + 1) % 3, (axis + 2) % 3
        uv = tri[:, :, [a0, a1]]  # [F, 3, 2]
        lo = np.maximum(np.ceil(uv.min(axis=1)), 1).astype(np.int64)
        hi = np.minimum(np.floor(uv.max(axis=1)), resolution - 1).astype(np.int64)
        span = np.maximum(hi - lo + 1, 0)
        edges = _canonical_edges(uv)
        live = (span[:, 0] * span[:, 1] > 0) & edges.valid
        for tri_id, local in _ragged_chunks(np.where(live, span[:, 0] * span[:, 1], 0)):
            ij = lo[tri_id] + np.stack([local // span[tri_id, 1], local % span[tri_id, 1]], axis=1)
            inside, bary = edges.test(tri_id, ij.astype(np.float64))
            tri_id, ij, bary = tri_id[inside], ij[inside], bary[inside]
            height = (bary * tri[tri_id, :, axis]).sum(axis=1)
            k = np.floor(height).astype(np.int64)
            ok = (k >= 0) & (k < resolution)
            tri_id, ij, height, k = tri_id[ok], ij[ok], height[ok], k[ok]
            lower = np.empty((tri_id.size, 3), dtype=np.int64)
            lower[:, a0], lower[:, a1], lower[:, axis] = ij[:, 0] - 1, ij[:, 1] - 1, k
            point = np.empty((tri_id.size, 3))
            point[:, a0], point[:, a1], point[:, axis] = ij[:, 0], ij[:, 1], height
            out.append((tri_id, np.full(tri_id.size, axis), lower, point))
    if not out:
        return _Crossings(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 3)))
    return _Crossings(*(np.concatenate(x) for x in zip(*out)))


@dataclass
class _CanonicalEdges:
    """2D edge functions of projected triangles, evaluated identically by every triangle sharing an edge."""

    start: np.ndarray  # [F, 3, 2] lexicographically smaller endpoint of edge k (opposite vertex k)
    direction: np.ndarray  # [F, 3, 2] larger endpoint - smaller endpoint
    interior: np.ndarray  # [F, 3] sign of the edge function at the opposite vertex
    tie: np.ndarray  # [F, 3] sign the edge function takes at a point on the edge nudged by (eps, eps^2)
    valid: np.ndarray  # [F] projection has non-zero area

    def test(self, tri_id: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside [M], barycentric [M, 3]) of points q [M, 2] against triangles tri_id [M]."""
        d, s = self.direction[tri_id], self.start[tri_id]
        rel = q[:, None, :] - s
        value = d[..., 0] * rel[..., 1] - d[..., 1] * rel[..., 0]  # [M, 3]
        side = np.where(value != 0, np.sign(value), self.tie[tri_id])
        interior = self.interior[tri_id]
        inside = (side * interior > 0).all(axis=1)
        weight = np.abs(value)
        bary = weight / np.maximum(weight.sum(axis=1, keepdims=True), 1e-300)
        return inside, bary


def _canonical_edges(uv: np.ndarray) -> _CanonicalEdges:
    a, b = uv[:, [1, 2, 0]], uv[:, [2, 0, 1]]  # edge k runs between vertices k+1 and k+2
    swap = (a[..., 0] > b[..., 0]) | ((a[..., 0] == b[..., 0]) & (a[..., 1] > b[..., 1]))
    start = np.where(swap[..., None], b, a)
    direction = np.where(swap[..., None], a, b) - start
    rel = uv - start
    interior = np.sign(direction[..., 0] * rel[..., 1] - direction[..., 1] * rel[..., 0])
    tie = np.where(direction[..., 1] != 0, -np.sign(direction[..., 1]), np.sign(direction[..., 0]))
    valid = (interior != 0).all(axis=1) & (tie != 0).all(axis=1)
    return _CanonicalEdges(start, direction, interior, tie, valid)


def _face_cell_pairs(tri: np.ndarray, planes: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(triangle, cell) pairs where the triangle overlaps the closed cell (the reference's plane + 3 projection
    test). Candidates: per column along the triangle's dominant normal axis, the cells its plane passes through."""
    normal = planes[:, :3]
    keep = np.abs(normal).max(axis=1) > 0
    tri_all = np.nonzero(keep)[0]
    dom = np.abs(normal[tri_all]).argmax(axis=1)
    e1, e2 = (dom + 1) % 3, (dom + 2) % 3
    rows = np.arange(tri_all.size)
    tmin, tmax = tri[tri_all].min(axis=1), tri[tri_all].max(axis=1)
    lo = np.clip(np.floor(tmin), 0, resolution - 1).astype(np.int64)
    hi = np.clip(np.floor(tmax), 0, resolution - 1).astype(np.int64)
    n1 = hi[rows, e1] - lo[rows, e1] + 1
    n2 = hi[rows, e2] - lo[rows, e2] + 1
    out_tri, out_cell = [], []
    for owner, local in _ragged_chunks(n1 * n2):
        i = lo[owner, e1[owner]] + local // n2[owner]
        j = lo[owner, e2[owner]] + local % n2[owner]
        t = tri_all[owner]
        nd, ne1, ne2 = (normal[t, ax[owner]] for ax in (dom, e1, e2))
        # Height of the plane along the dominant axis at the 4 column corners.
        ci = (i[:, None] + np.array([0, 0, 1, 1])).astype(np.float64)
        cj = (j[:, None] + np.array([0, 1, 0, 1])).astype(np.float64)
        height = -(ne1[:, None] * ci + ne2[:, None] * cj + planes[t, 3][:, None]) / nd[:, None]
        k0 = np.floor(np.maximum(height.min(axis=1), tmin[owner, dom[owner]]))
        k1 = np.floor(np.minimum(height.max(axis=1), tmax[owner, dom[owner]]))
        k0 = np.clip(k0, 0, resolution - 1).astype(np.int64)
        k1 = np.clip(k1, 0, resolution - 1).astype(np.int64)
        owner2, local2 = _ragged(np.maximum(k1 - k0 + 1, 0))
        cell = np.empty((owner2.size, 3), dtype=np.int64)
        o = owner[owner2]
        r = np.arange(owner2.size)
        cell[r, dom[o]] = k0[owner2] + local2
        cell[r, e1[o]] = i[owner2]
        cell[r, e2[o]] = j[owner2]
        t2 = tri_all[o]
        hit = _triangle_box_overlap(tri[t2], normal[t2], cell.astype(np.float64))
        out_tri.append(t2[hit])
        out_cell.append(cell[hit])
    if not out_tri:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    return np.concatenate(out_tri), np.concatenate(out_cell)


def _triangle_box_overlap(tri: np.ndarray, normal: np.ndarray, box_min: np.ndarray) -> np.ndarray:
    """Does triangle [M, 3, 3] touch the unit box at box_min [M, 3]? (plane test, then edge tests in the xy, yz
    and zx projections; touching counts)."""
    v0 = tri[:, 0]
    crit = (normal > 0).astype(np.float64)
    d1 = (normal * (crit - v0)).sum(axis=1)
    d2 = (normal * (1 - crit - v0)).sum(axis=1)
    np_ = (normal * box_min).sum(axis=1)
    ok = (np_ + d1) * (np_ + d2) <= 0
    edges = tri[:, [1, 2, 0]] - tri  # e_k = v_{k+1} - v_k, starting at v_k
    for x, y, z in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        mul = np.where(normal[:, z] < 0, -1.0, 1.0)[:, None]
        ne = np.stack([-mul * edges[..., y], mul * edges[..., x]], axis=-1)  # [M, 3, 2]
        start = tri[..., [x, y]]
        de = -(ne * start).sum(axis=-1) + np.maximum(ne, 0).sum(axis=-1)
        ok &= ((ne * box_min[:, None, [x, y]]).sum(axis=-1) + de >= 0).all(axis=1)
    return ok


def _boundary_segments(p: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[B, 2, 3] edges used by exactly one face."""
    e = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    uniq, count = np.unique(e, axis=0, return_counts=True)
    return p[uniq[count == 1]]


def _segment_cells(seg: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment, cell) pairs for every cell a segment passes through (what the reference's DDA walk visits):
    split each segment at its grid-plane crossings and take the cell of each piece's midpoint."""
    a, b = seg[:, 0], seg[:, 1]
    length = np.linalg.norm(b - a, axis=1)
    keep = np.nonzero(length >= 1e-6 * resolution)[0]
    a, b, d = a[keep], b[keep], (b - a)[keep]
    ts = [np.zeros(keep.size), np.ones(keep.size)]
    owners = [np.arange(keep.size)] * 2
    for axis in range(3):
        lo = np.floor(np.minimum(a[:, axis], b[:, axis])) + 1
        hi = np.ceil(np.maximum(a[:, axis], b[:, axis])) - 1
        owner, local = _ragged(np.maximum(hi - lo + 1, 0).astype(np.int64))
        ts.append((lo[owner] + local - a[owner, axis]) / d[owner, axis])
        owners.append(owner)
    t, owner = np.concatenate(ts), np.concatenate(owners)
    order = np.lexsort((t, owner))
    t, owner = t[order], owner[order]
    piece = (owner[1:] == owner[:-1]) & (t[1:] > t[:-1])
    mid = (t[:-1][piece] + t[1:][piece]) / 2
    o = owner[:-1][piece]
    cell = np.floor(a[o] + mid[:, None] * d[o]).astype(np.int64)
    inside = ((cell >= 0) & (cell < resolution)).all(axis=1)
    pairs = np.unique(np.stack([keep[o[inside]], _keys(cell[inside], resolution)], axis=1), axis=0)
    return pairs[:, 0], np.stack(np.unravel_index(pairs[:, 1], (resolution,) * 3), axis=1)


def _planes(tri: np.ndarray) -> np.ndarray:
    """[F, 4] (n, -n.v0) with unit n; zero for degenerate triangles (they add nothing, as in the reference)."""
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 1])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(norm > 0, n / np.where(norm > 0, norm, 1), 0)
    return np.concatenate([n, -(n * tri[:, 0]).sum(axis=1, keepdims=True)], axis=1)


def _plane_qef(planes: np.ndarray) -> np.ndarray:
    """[M, 16] flattened plane plane^T: the squared distance to the plane as a homogeneous quadric."""
    return (planes[:, :, None] * planes[:, None, :]).reshape(-1, 16)


def _line_qef(seg: np.ndarray) -> np.ndarray:
    """[B, 16] quadric of the squared distance to each segment's supporting line."""
    d = seg[:, 1] - seg[:, 0]
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-300)
    a = np.eye(3) - d[:, :, None] * d[:, None, :]
    v0 = seg[:, 0]
    b = -(a @ v0[:, :, None])[..., 0]
    q = np.zeros((seg.shape[0], 4, 4))
    q[:, :3, :3], q[:, :3, 3], q[:, 3, :3] = a, b, b
    q[:, 3, 3] = (v0 * (a @ v0[:, :, None])[..., 0]).sum(axis=1)
    return q.reshape(-1, 16)


def _point_qef(p: np.ndarray) -> np.ndarray:
    """[N, 16] quadric of the squared distance to each point."""
    q = np.zeros((p.shape[0], 4, 4))
    q[:, [0, 1, 2], [0, 1, 2]] = 1
    q[:, :3, 3], q[:, 3, :3] = -p, -p
    q[:, 3, 3] = (p * p).sum(axis=1)
    return q.reshape(-1, 16)


def solve_box_qef(q: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """argmin p^T Q p over each voxel box [lo, lo + 1] (homogeneous p): the free minimum when it lies in the box,
    else the best of the minima restricted to the box's 6 faces, 12 edges and 8 corners (reference order)."""
    x = np.linalg.solve(q[:, :3, :3], -q[:, :3, 3:])[..., 0]
    hi = lo + 1
    out = ~((x >= lo) & (x <= hi)).all(axis=1)
    if not out.any():
        return x
    q, lo, hi = q[out], lo[out], hi[out]
    m = q.shape[0]
    rows = np.arange(m)
    cands: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    for fixed in range(3):  # one coordinate on a face, two free
        a1, a2 = (fixed + 1) % 3, (fixed + 2) % 3
        mat = q[:, [a1, a2]][:, :, [a1, a2]]
        for bound in (lo, hi):
            rhs = -(q[:, [a1, a2], fixed] * bound[:, fixed, None] + q[:, [a1, a2], 3])
            sol = _solve2(mat, rhs)
            p = np.empty((m, 3))
            p[:, fixed], p[:, a1], p[:, a2] = bound[:, fixed], sol[:, 0], sol[:, 1]
            cands.append(p)
            valid.append((sol >= lo[:, [a1, a2]]).all(axis=1) & (sol <= hi[:, [a1, a2]]).all(axis=1))
    for free in range(3):  # two coordinates on an edge, one free
        a1, a2 = (free + 1) % 3, (free + 2) % 3
        for b1, b2 in ((lo, lo), (lo, hi), (hi, lo), (hi, hi)):
            with np.errstate(divide="ignore", invalid="ignore"):
                t = -(q[:, free, a1] * b1[:, a1] + q[:, free, a2] * b2[:, a2] + q[:, free, 3]) / q[:, free, free]
            p = np.empty((m, 3))
            p[:, free], p[:, a1], p[:, a2] = t, b1[:, a1], b2[:, a2]
            cands.append(p)
            valid.append((t >= lo[:, free]) & (t <= hi[:, free]))
    for cx in (hi, lo):  # corners, in the reference's enumeration order
        for cy in (hi, lo):
            for cz in (hi, lo):
                cands.append(np.stack([cx[:, 0], cy[:, 1], cz[:, 2]], axis=1))
                valid.append(np.ones(m, dtype=bool))
    p = np.stack(cands, axis=1)  # [m, 26, 3]
    ph = np.concatenate([p, np.ones((m, p.shape[1], 1))], axis=2)
    err = np.einsum("mci,mij,mcj->mc", ph, q, ph)
    err = np.where(np.stack(valid, axis=1) & np.isfinite(err), err, np.inf)
    x[out] = p[rows, err.argmin(axis=1)]
    return x


def _solve2(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched 2x2 solve; singular systems give NaN (their candidate is then rejected)."""
    det = mat[:, 0, 0] * mat[:, 1, 1] - mat[:, 0, 1] * mat[:, 1, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (mat[:, 1, 1] * rhs[:, 0] - mat[:, 0, 1] * rhs[:, 1]) / det
        y = (mat[:, 0, 0] * rhs[:, 1] - mat[:, 1, 0] * rhs[:, 0]) / det
    return np.stack([x, y], axis=1)


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


def _keys(cells: np.ndarray, resolution: int) -> np.ndarray:
    return (cells[:, 0] * resolution + cells[:, 1]) * resolution + cells[:, 2]


def _scatter(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """[n, K] row sums of values [M, K] grouped by index."""
    return np.stack([np.bincount(index, values[:, k], minlength=n) for k in range(values.shape[1])], axis=1)


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, local): item i repeated counts[i] times, with 0..counts[i]-1 alongside (numpy view of
    `expand_segments`)."""
    owner, local = expand_segments(torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64)))
    return owner.numpy(), local.numpy()


def _ragged_chunks(counts: np.ndarray):
    """`_ragged(counts)` in pieces of about CHUNK entries (a single huge item is split too)."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if counts.size else 0
    for begin in range(0, total, CHUNK):
        flat = np.arange(begin, min(begin + CHUNK, total))
        owner = np.searchsorted(ends, flat, side="right")
        yield owner, flat - (ends[owner] - counts[owner])
