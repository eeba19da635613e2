"""The reference voxeliser, o-voxel's `mesh_to_flexible_dual_grid` (its C++ CPU code), rebuilt in torch.

Three QEF terms, as in the reference:
- intersection term: a scan-line pass per triangle and axis finds every interior grid line the triangle crosses;
  the 4 cells around that grid edge become voxels (first touched, first listed), the cell whose upper corner
  carries the edge gets the edge flag, and all 4 get the triangle's plane quadric and the crossing point;
- face term (`face_weight > 0` switches it on; the reference adds the quadric unweighted): the plane quadric of
  every triangle is added to every existing voxel the triangle touches (triangle/box overlap test);
- boundary term: the line quadric of every edge used by one face, times `boundary_weight`, is added to every
  existing voxel a 3D DDA walk along the edge visits;
then `regularization_weight * count` times the squared distance to the mean crossing point, and the QEF is
minimised inside the voxel (free minimum if inside, else the best of the 6 face, 12 edge and 8 corner minima).

Exactness: every discrete decision is made with the reference's own arithmetic — the scan-line in float64 from
float32 vertices, the triangle/box test and box bounds in float32, the DDA in its mixed precision — so voxel
sets, edge flags and row order are identical. The quadrics are accumulated and solved in float64 (the reference
uses float32 and Eigen's QR): dual vertices agree with the reference's to about 1e-6 of a voxel.
Work is in world units relative to the box minimum, as the reference's; everything is whole-tensor torch code,
on whichever device the vertices are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backend.native import VoxelIndex
from backend.ovoxel.segments import expand_segments

# Cells of the 4 voxels around a crossed grid edge, as (offset on ax0, offset on ax1) in the reference's loop order.
AROUND_EDGE = ((0, 0), (0, 1), (1, 0), (1, 1))
CHUNK = 1 << 20  # rows handled at once by the accumulation and the face test; bounds temporary memory
FACE_MARGIN = 1e-2  # voxels: slack of the face term's candidate cells around the triangle's plane


@dataclass
class FlexibleDualGrid:
    """The voxeliser's output; rows in the reference's order (the order the scan-line first touches voxels)."""

    coords: torch.Tensor  # int32 [N, 3] voxel indices
    dual_vertices: torch.Tensor  # float32 [N, 3] world units from the box minimum, as the reference returns them
    intersected: torch.Tensor  # bool [N, 3] edge flags
    crossing_pairs: tuple[torch.Tensor, torch.Tensor]  # unique (triangle, row) pairs of the intersection term
    grid_size: int

    def local(self) -> torch.Tensor:
        """float32 [N, 3] dual vertices in voxel units from each voxel's min corner, in [0, 1]: the reference's
        `dual_vertices * resolution - voxel_indices` (the shape encoder's input)."""
        return self.dual_vertices * self.grid_size - self.coords.float()


def mesh_to_flexible_dual_grid(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    grid_size: int,
    *,
    face_weight: float = 1.0,
    boundary_weight: float = 0.2,
    regularization_weight: float = 1e-2,
) -> FlexibleDualGrid:
    """Voxelise a triangle mesh inside [-0.5, 0.5]^3 on a grid_size^3 grid (aabb [[-0.5]*3, [0.5]*3]).

    The defaults are what the texturing pipeline and the training data pass (the function's own defaults in
    the reference are 1.0 / 1.0 / 0.1). `regularization_weight` must be > 0: it keeps every voxel's QEF
    well-posed (the reference allows 0 and then returns an arbitrary least-squares point).
    """
    if grid_size < 2:
        raise ValueError(f"grid_size must be at least 2, got {grid_size}")
    if regularization_weight <= 0:
        raise ValueError("regularization_weight must be > 0 (it makes every voxel's QEF well-posed)")
    device = vertices.device
    vs32 = torch.tensor(1.0, dtype=torch.float32, device=device) / grid_size
    p32 = vertices.float() - torch.tensor(-0.5, dtype=torch.float32, device=device)  # reference: v - aabb[0]
    f = faces.long()
    tri32 = p32[f]  # [F, 3, 3]
    normal, offset = _planes(tri32)

    cross = _scanline_crossings(tri32, vs32, grid_size)
    if cross.tri.numel() == 0:
        raise ValueError(f"the surface crosses no edge of the {grid_size}^3 grid; nothing to voxelise")
    g = grid_size
    keys = _cell_keys(cross, g)  # [C, 4] int64, event order
    unique_keys, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    position = torch.arange(inverse.numel(), device=device)
    first = torch.full((unique_keys.numel(),), inverse.numel(), dtype=torch.long, device=device)
    first.scatter_reduce_(0, inverse, position, "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    row = rank[inverse].reshape(-1, 4)
    ordered = unique_keys[order]
    coords = torch.stack([ordered // (g * g), ordered // g % g, ordered % g], dim=1)
    n = coords.shape[0]

    intersected = torch.zeros(n, 3, dtype=torch.bool, device=device)
    intersected[row[:, 0], cross.axis] = True
    count = torch.bincount(row.reshape(-1), minlength=n)
    crossing_of_cell = torch.arange(row.shape[0], device=device).repeat_interleave(4)
    mean = _ordered_sum(row.reshape(-1), crossing_of_cell, cross.point, n) / count.float().unsqueeze(1)

    # Every quadric added to a voxel, in the reference's order: crossings, then face term, then boundary term.
    plane_qef = _outer(torch.cat([normal, offset.unsqueeze(1)], dim=1))
    tables, rows, sources = [plane_qef], [row.reshape(-1)], [cross.tri.repeat_interleave(4)]
    index = VoxelIndex(coords)
    if face_weight > 0:
        for tri_id, cells in _face_cells(tri32, normal, offset, vs32, g):
            hit = index.lookup(cells)
            rows.append(hit[hit >= 0])
            sources.append(tri_id[hit >= 0])
    if boundary_weight > 0:
        seg, seg_id, cells = _boundary_cells(p32, f, vs32, g)
        hit = index.lookup(cells)
        keep = torch.nonzero(hit >= 0).squeeze(1)
        keep = keep[torch.sort(seg_id[keep], stable=True).indices]  # per voxel: segments in their order
        rows.append(hit[keep])
        sources.append(seg_id[keep] + f.shape[0])
        tables.append(torch.tensor(boundary_weight, dtype=torch.float32, device=device) * _line_qef(seg))
    qef = _ordered_sum(torch.cat(rows), torch.cat(sources), torch.cat(tables), n)
    weight = torch.tensor(regularization_weight, dtype=torch.float32, device=device) * count.float()
    qef = qef + weight.unsqueeze(1) * _point_qef(mean)

    lo = coords.float() * vs32  # the reference's float32 box corners
    hi = (coords + 1).float() * vs32
    dual_vertices = solve_box_qef(qef.reshape(n, 4, 4), lo, hi)

    tri_of_row = cross.tri.repeat_interleave(4)
    pairs = torch.unique(tri_of_row * n + row.reshape(-1))
    return FlexibleDualGrid(coords.int(), dual_vertices, intersected, (pairs // n, pairs % n), grid_size)


def _ordered_sum(rows: torch.Tensor, sources: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [n, K]: for each row, table[sources] summed one term at a time in the given order.

    This is how the reference accumulates its float32 quadrics and crossing points; the order matters, because
    its box-constrained minimum is decided by error values within float32 rounding of each other.
    Rows are ranked by their number of terms, so step k adds one term to a contiguous prefix of rows.
    """
    sources = sources[torch.sort(rows, stable=True).indices]
    count = torch.bincount(rows, minlength=n)
    start = torch.cumsum(count, 0) - count
    rank = torch.sort(count, descending=True, stable=True).indices
    start, longest = start[rank], int(count.max())
    active = torch.bincount(count, minlength=longest + 1).flip(0).cumsum(0).flip(0).tolist()  # rows with >= k
    acc = torch.zeros(n, table.shape[1], dtype=torch.float32, device=table.device)
    for k in range(longest):
        m = active[k + 1]
        acc[:m] += table[sources[start[:m] + k]]
    out = torch.empty_like(acc)
    out[rank] = acc
    return out


# ----------------------------------------------------------------------------------------------------------------
# Intersection term: the scan line


@dataclass
class _Crossings:
    """One row per crossing of a triangle with an interior grid line, in the reference's visiting order."""

    tri: torch.Tensor  # long [C] triangle
    axis: torch.Tensor  # long [C] axis of the crossed grid edge (the reference's ax2)
    key: torch.Tensor  # long [C] key (x * G + y) * G + z of the cell (x_idx, y_idx, z_idx) on (ax0, ax1, ax2)
    point: torch.Tensor  # float32 [C, 3] crossing point, world units (computed in float64, stored as float32)


def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """The reference's lerp: va where a == b, else (1 - alpha) va + alpha vb with alpha = (t - a) / (b - a)."""
    same = a == b
    alpha = (t - a) / torch.where(same, torch.ones_like(a), b - a)
    out = (1 - alpha).unsqueeze(1) * va + alpha.unsqueeze(1) * vb
    return torch.where(same.unsqueeze(1), va, out)


def _grid_index(value: torch.Tensor, vs: float, grid_size: int) -> torch.Tensor:
    """std::clamp(int(value / voxel_size), 0, grid_size - 1): truncation towards zero, as C++'s int()."""
    return torch.trunc(value / vs).long().clamp(0, grid_size - 1)


def _line_coordinate(index: torch.Tensor, vs32: torch.Tensor) -> torch.Tensor:
    """(index + 1) * voxel_size, computed in float32 as the reference's int * float, then widened."""
    return ((index + 1).float() * vs32).double()


def _scanline_crossings(tri32: torch.Tensor, vs32: torch.Tensor, grid_size: int) -> _Crossings:
    """The reference's `scan_line_fill` for every triangle and axis, vectorised over triangles, rows and columns.

    For axis ax2 the triangle is seen in (ax0, ax1) = (x, y) with height z; its vertices are sorted by y (a
    stable sort, as libstdc++'s insertion sort for 3 items); rows y_idx in [start, mid) scan the lower half
    (edges t0-t1, t0-t2), rows in [mid, end) the upper half (t2-t1, t2-t0). Each row crosses the grid line
    y = (y_idx + 1) * vs between its two edge points t3, t4, and each column x_idx in [x(t3), x(t4)) the line
    x = (x_idx + 1) * vs; the crossing's height gives z_idx, which must lie inside the grid.
    """
    vs = float(vs32)
    device = tri32.device
    parts: list[tuple[torch.Tensor, ...]] = []
    for ax2 in range(3):
        ax0, ax1 = (ax2 + 1) % 3, (ax2 + 2) % 3
        t = tri32[:, :, [ax0, ax1, ax2]].double()
        order = torch.sort(t[:, :, 1], dim=1, stable=True).indices
        t = torch.gather(t, 1, order.unsqueeze(2).expand(-1, -1, 3))
        start, mid, end = (_grid_index(t[:, k, 1], vs, grid_size) for k in range(3))
        for half, (first, last, top, a, b) in enumerate(((start, mid, 0, 1, 2), (mid, end, 2, 1, 0))):
            tri_id, local = expand_segments((last - first).clamp_min(0))
            y_idx = first[tri_id] + local
            y = _line_coordinate(y_idx, vs32)
            tt, ta, tb = t[tri_id, top], t[tri_id, a], t[tri_id, b]
            t3 = _lerp(tt[:, 1], ta[:, 1], y, tt[:, [0, 2]], ta[:, [0, 2]])
            t4 = _lerp(tt[:, 1], tb[:, 1], y, tt[:, [0, 2]], tb[:, [0, 2]])
            swap = (t3[:, 0] > t4[:, 0]).unsqueeze(1)
            t3, t4 = torch.where(swap, t4, t3), torch.where(swap, t3, t4)
            x_start, x_end = _grid_index(t3[:, 0], vs, grid_size), _grid_index(t4[:, 0], vs, grid_size)
            row_id, local = expand_segments((x_end - x_start).clamp_min(0))
            x_idx = x_start[row_id] + local
            x = _line_coordinate(x_idx, vs32)
            z = _lerp(t3[row_id, 0], t4[row_id, 0], x, t3[row_id, 1:], t4[row_id, 1:])[:, 0]
            z_idx = torch.trunc(z / vs).long()
            ok = (z_idx >= 0) & (z_idx < grid_size)
            row_id, x_idx, x, z, z_idx = row_id[ok], x_idx[ok], x[ok], z[ok], z_idx[ok]
            owner = tri_id[row_id]
            point = torch.empty(owner.numel(), 3, dtype=torch.float64, device=device)
            point[:, ax0], point[:, ax1], point[:, ax2] = x, y[row_id], z
            stride = [grid_size * grid_size, grid_size, 1]
            key = x_idx * stride[ax0] + y_idx[row_id] * stride[ax1] + z_idx * stride[ax2]
            # Visiting order: triangle, then axis, then half (the order parts are listed in: a stable sort by
            # triangle keeps it); rows and columns already ascend inside each part.
            parts.append((owner, torch.full_like(owner, ax2), key, point.float()))
    tri, axis, key, point = (torch.cat(x) for x in zip(*parts))
    order = torch.sort(tri, stable=True).indices
    return _Crossings(tri[order], axis[order], key[order], point[order])


def _cell_keys(cross: _Crossings, grid_size: int) -> torch.Tensor:
    """int64 [C, 4] keys (x * G + y) * G + z of the 4 cells around each crossed edge, in the reference's order."""
    stride = torch.tensor([grid_size * grid_size, grid_size, 1], device=cross.key.device)
    offsets = torch.tensor(AROUND_EDGE, device=cross.key.device)  # [4, 2] on (ax0, ax1)
    step = torch.stack([stride[(cross.axis + 1) % 3], stride[(cross.axis + 2) % 3]], dim=1)  # [C, 2]
    return cross.key.unsqueeze(1) + (offsets.unsqueeze(0) * step.unsqueeze(1)).sum(dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Face term: triangle/box overlap, in the reference's float32 arithmetic


def _dot2(ax: torch.Tensor, ay: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    return ax * bx + ay * by


def _dot3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eigen's dot/squaredNorm of fixed 3-vectors (its unrolled reduction): a0 b0 + (a1 b1 + a2 b2)."""
    return _unrolled_sum([a[..., k] * b[..., k] for k in range(3)])


def _dot4(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eigen's SSE-vectorised 4-term sum (one packet, then its horizontal add): (a0 b0 + a2 b2) + (a1 b1 + a3 b3)."""
    return (a[..., 0] * b[..., 0] + a[..., 2] * b[..., 2]) + (a[..., 1] * b[..., 1] + a[..., 3] * b[..., 3])


def _sqrt32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (through float64; torch's vectorised CPU float32 sqrt is not always)."""
    return torch.sqrt(x.double()).float()


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
                        a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
                        a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]], dim=-1)


def _planes(tri32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit normal [F, 3], offset [F]) in float32 as the reference: n = normalized((v1 - v0) x (v2 - v1)),
    d = -n . v0. A zero cross product stays zero (Eigen's normalized()), so degenerate triangles add nothing."""
    v0, v1, v2 = tri32.unbind(1)
    n = _cross(v1 - v0, v2 - v1)
    sq = _dot3(n, n)
    n = torch.where((sq > 0).unsqueeze(1), n / _sqrt32(sq).unsqueeze(1), n)
    return n, -_dot3(n, v0)


# (axis u, axis v, normal axis deciding the edge-normal sign) of the reference's XY, YZ and ZX projection tests.
PROJECTIONS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


def _face_cells(tri32: torch.Tensor, normal: torch.Tensor, offset: torch.Tensor, vs32: torch.Tensor,
                grid_size: int):
    """Yields (triangle [M], cell [M, 3]) chunks: every cell of the grid the reference's `face_qef` marks.

    The reference tests every cell of the triangle's bounding box [int(min / vs), int(max / vs + 1)). We test
    only the cells of that box the triangle's plane meets (per column along the dominant normal axis, with
    FACE_MARGIN of slack), with the same float32 test; no other cell can pass its plane test.
    """
    device = tri32.device
    vs = float(vs32)
    live = torch.nonzero(_dot3(normal, normal) > 0).squeeze(1)
    t = tri32[live]
    bb_lo = torch.trunc(t.amin(dim=1) / vs32).long().clamp_min(0)
    bb_hi = torch.trunc(t.amax(dim=1) / vs32 + 1).long().clamp_max(grid_size)
    n64, d64 = normal[live].double(), offset[live].double()
    dom = n64.abs().argmax(dim=1)
    e1, e2 = (dom + 1) % 3, (dom + 2) % 3
    rows = torch.arange(live.numel(), device=device)
    lo1, lo2 = bb_lo[rows, e1], bb_lo[rows, e2]
    n1 = (bb_hi[rows, e1] - lo1).clamp_min(0)
    n2 = (bb_hi[rows, e2] - lo2).clamp_min(0)
    tests = _face_test_setup(t, normal[live], vs32)
    corners = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float64, device=device)
    for owner, local in _chunked_segments(n1 * n2):
        i = lo1[owner] + local // n2[owner]
        j = lo2[owner] + local % n2[owner]
        nd, ne1, ne2 = (n64[owner].gather(1, ax[owner].unsqueeze(1)).squeeze(1) for ax in (dom, e1, e2))
        q1 = (i.double().unsqueeze(1) + corners[:, 0]) * vs
        q2 = (j.double().unsqueeze(1) + corners[:, 1]) * vs
        height = -(ne1.unsqueeze(1) * q1 + ne2.unsqueeze(1) * q2 + d64[owner].unsqueeze(1)) / nd.unsqueeze(1)
        # Cells k with [k, k + 1] meeting [min height, max height], widened by far more than float32 rounding.
        k0 = torch.floor(height.amin(dim=1) / vs - FACE_MARGIN).long().clamp_min(bb_lo[owner, dom[owner]])
        k1 = torch.floor(height.amax(dim=1) / vs + FACE_MARGIN).long().clamp_max(bb_hi[owner, dom[owner]] - 1)
        column, k_local = expand_segments((k1 - k0 + 1).clamp_min(0))
        o = owner[column]
        cell = torch.empty(column.numel(), 3, dtype=torch.long, device=device)
        r = torch.arange(column.numel(), device=device)
        cell[r, dom[o]] = k0[column] + k_local
        cell[r, e1[o]] = i[column]
        cell[r, e2[o]] = j[column]
        hit = _face_test(tests, o, cell, vs32)
        yield live[o[hit]], cell[hit]


@dataclass
class _FaceTests:
    """Per-triangle float32 constants of the reference's triangle/box test."""

    normal: torch.Tensor  # [F, 3]
    d1: torch.Tensor  # [F]
    d2: torch.Tensor  # [F]
    edge_normals: list[tuple[torch.Tensor, torch.Tensor]]  # per projection: (nu [F, 3], nv [F, 3]) per edge
    edge_offsets: list[torch.Tensor]  # per projection: [F, 3]


def _face_test_setup(tri32: torch.Tensor, normal: torch.Tensor, vs32: torch.Tensor) -> _FaceTests:
    v = tri32.unbind(1)
    edges = (v[1] - v[0], v[2] - v[1], v[0] - v[2])  # edge k starts at vertex k
    c = torch.where(normal > 0, vs32, torch.zeros_like(vs32))
    d1 = _dot3(normal, c - v[0])
    d2 = _dot3(normal, (vs32 - c) - v[0])
    edge_normals, edge_offsets = [], []
    for u, w, sign_axis in PROJECTIONS:
        mul = torch.where(normal[:, sign_axis] < 0, -1.0, 1.0).to(tri32.dtype)
        nu = torch.stack([-mul * e[:, w] for e in edges], dim=1)
        nv = torch.stack([mul * e[:, u] for e in edges], dim=1)
        base_u = torch.stack([vk[:, u] for vk in v], dim=1)
        base_w = torch.stack([vk[:, w] for vk in v], dim=1)
        off = -_dot2(nu, nv, base_u, base_w) + _dot2(nu.clamp_min(0), nv.clamp_min(0), vs32, vs32)
        edge_normals.append((nu, nv))
        edge_offsets.append(off)
    return _FaceTests(normal, d1, d2, edge_normals, edge_offsets)


def _face_test(tests: _FaceTests, tri: torch.Tensor, cell: torch.Tensor, vs32: torch.Tensor) -> torch.Tensor:
    """bool [M]: does the reference's float32 test accept cell [M, 3] for triangle tri [M]?"""
    p = vs32 * cell.float()  # the cell's min corner
    n_dot_p = _dot3(tests.normal[tri], p)
    ok = (n_dot_p + tests.d1[tri]) * (n_dot_p + tests.d2[tri]) <= 0
    for (u, w, _), (nu, nv), off in zip(PROJECTIONS, tests.edge_normals, tests.edge_offsets):
        value = _dot2(nu[tri], nv[tri], p[:, u:u + 1], p[:, w:w + 1]) + off[tri]
        ok &= (value >= 0).all(dim=1)
    return ok


def _chunked_segments(counts: torch.Tensor):
    """`expand_segments(counts)` in pieces of about CHUNK elements (whole segments, at least one per piece)."""
    ends = torch.cumsum(counts, 0)
    first, total = 0, counts.numel()
    while first < total:
        base = int(ends[first - 1]) if first else 0
        last = min(total, max(first + 1, int(torch.searchsorted(ends, base + CHUNK, right=True))))
        owner, local = expand_segments(counts[first:last])
        yield owner + first, local
        first = last


# ----------------------------------------------------------------------------------------------------------------
# Boundary term: the DDA walk


def _boundary_segments(p32: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[B, 2, 3] float32 edges used by exactly one face, from the lower vertex index to the higher."""
    e = torch.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), dim=1).values
    key, count = torch.unique(e[:, 0] * p32.shape[0] + e[:, 1], return_counts=True)
    single = key[count == 1]
    return p32[torch.stack([single // p32.shape[0], single % p32.shape[0]], dim=1)]


def _boundary_cells(p32: torch.Tensor, faces: torch.Tensor, vs32: torch.Tensor, grid_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segments [B, 2, 3] float32, segment [M], cell [M, 3]): the cells the reference's DDA visits, in bounds.

    The walk starts in v0's cell and steps across the nearest cell wall (ties: z over y over x, as the
    reference's comparisons) while that wall is within the segment's length; times accumulate by repeated
    addition in float64 as in the reference.
    """
    device = p32.device
    seg32 = _boundary_segments(p32, faces)
    d = (seg32[:, 1] - seg32[:, 0]).double()
    length = torch.sqrt((d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2])
    keep = length >= 1e-6
    seg32, d, length = seg32[keep], d[keep], length[keep]
    d = d / length.unsqueeze(1)
    v0 = seg32[:, 0]
    current = torch.floor(v0 / vs32).long()
    step = torch.where(d > 0, 1, -1)
    border = (vs32 * (current + (step > 0).long()).float() - v0).double()
    zero = d == 0
    inf = torch.full_like(d, float("inf"))
    t_max = torch.where(zero, inf, border / torch.where(zero, torch.ones_like(d), d))
    t_delta = torch.where(zero, inf, float(vs32) / d.abs().clamp_min(1e-300))
    seg_ids, cells = [torch.arange(d.shape[0], device=device)], [current.clone()]
    active = torch.arange(d.shape[0], device=device)
    while active.numel():
        tm = t_max[active]
        x_lt_y = tm[:, 0] < tm[:, 1]
        axis = torch.where(x_lt_y, torch.where(tm[:, 0] < tm[:, 2], 0, 2), torch.where(tm[:, 1] < tm[:, 2], 1, 2))
        go = tm.gather(1, axis.unsqueeze(1)).squeeze(1) <= length[active]
        active, axis = active[go], axis[go]
        current[active, axis] += step[active, axis]
        t_max[active, axis] += t_delta[active, axis]
        seg_ids.append(active)
        cells.append(current[active].clone())
    seg_id, cell = torch.cat(seg_ids), torch.cat(cells)
    inside = ((cell >= 0) & (cell < grid_size)).all(dim=1)
    return seg32, seg_id[inside], cell[inside]


# ----------------------------------------------------------------------------------------------------------------
# Quadrics and the box-constrained solve, in the reference's float32 arithmetic


def _outer(plane: torch.Tensor) -> torch.Tensor:
    """[M, 16] flattened plane plane^T: the squared distance to the plane as a homogeneous quadric."""
    return (plane.unsqueeze(2) * plane.unsqueeze(1)).reshape(-1, 16)


def _line_qef(seg: torch.Tensor) -> torch.Tensor:
    """float32 [B, 16] quadric of the squared distance to each segment's line (segments float32 [B, 2, 3]):
    A = I - d d^T (d the float64 unit direction, d d^T rounded to float32), b = -A v0, c = v0^T A v0."""
    d = (seg[:, 1] - seg[:, 0]).double()
    d = d / torch.sqrt(_dot3(d, d)).unsqueeze(1)
    a = torch.eye(3, dtype=torch.float32, device=seg.device) - (d.unsqueeze(2) * d.unsqueeze(1)).float()
    v0 = seg[:, 0]
    av0 = _dot3(a, v0.unsqueeze(1))  # [B, 3]: row i of A times v0
    v0a = _dot3(a.transpose(1, 2), v0.unsqueeze(1))  # [B, 3]: v0^T A
    q = torch.zeros(seg.shape[0], 4, 4, dtype=torch.float32, device=seg.device)
    q[:, :3, :3], q[:, :3, 3], q[:, 3, :3] = a, -av0, -av0
    q[:, 3, 3] = _dot3(v0a, v0)
    return q.reshape(-1, 16)


def _point_qef(p: torch.Tensor) -> torch.Tensor:
    """float32 [N, 16] quadric of the squared distance to each point (the reference's regularisation term)."""
    q = torch.zeros(p.shape[0], 4, 4, dtype=p.dtype, device=p.device)
    q[:, [0, 1, 2], [0, 1, 2]] = 1
    q[:, :3, 3], q[:, 3, :3] = -p, -p
    q[:, 3, 3] = _dot3(p, p)
    return q.reshape(-1, 16)


def solve_box_qef(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """float32 [N, 3]: the reference's box-constrained QEF minimum, bit for bit (float32 Q [N, 4, 4], box [lo, hi]).

    The free minimum (Eigen's column-pivoting QR) when it lies in the box; else the best of the minima restricted
    to the box's 6 faces (2x2 QR), 12 edges and 8 corners, scored by p^T Q p and enumerated in the reference's
    order (the first of equal errors wins).
    """
    x = _qr_solve(q[:, :3, :3], -q[:, :3, 3])
    out = ~((x >= lo) & (x <= hi)).all(dim=1)
    if not bool(out.any()):
        return x
    q, lo, hi = q[out], lo[out], hi[out]
    m = q.shape[0]
    one = torch.ones(m, dtype=q.dtype, device=q.device)
    cands: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    for fixed in range(3):  # one coordinate on a face, two free
        a1, a2 = (fixed + 1) % 3, (fixed + 2) % 3
        for bound in (lo[:, fixed], hi[:, fixed]):
            rhs = [-q[:, a, fixed] * bound + -q[:, a, 3] * one for a in (a1, a2)]
            s1, s2 = _qr_solve(q[:, [a1, a2]][:, :, [a1, a2]], torch.stack(rhs, dim=1)).unbind(1)
            p = torch.empty(m, 3, dtype=q.dtype, device=q.device)
            p[:, fixed], p[:, a1], p[:, a2] = bound, s1, s2
            cands.append(p)
            valid.append((s1 >= lo[:, a1]) & (s1 <= hi[:, a1]) & (s2 >= lo[:, a2]) & (s2 <= hi[:, a2]))
    for free in range(3):  # two coordinates on an edge, one free
        a1, a2 = (free + 1) % 3, (free + 2) % 3
        row = torch.stack([q[:, free, a1], q[:, free, a2], q[:, free, 3]], dim=1)
        for c1, c2 in ((lo, lo), (lo, hi), (hi, lo), (hi, hi)):
            t = -_dot3(row, torch.stack([c1[:, a1], c2[:, a2], one], dim=1)) / q[:, free, free]
            p = torch.empty(m, 3, dtype=q.dtype, device=q.device)
            p[:, free], p[:, a1], p[:, a2] = t, c1[:, a1], c2[:, a2]
            cands.append(p)
            valid.append((t >= lo[:, free]) & (t <= hi[:, free]))
    for cx in (hi, lo):  # corners, in the reference's enumeration order
        for cy in (hi, lo):
            for cz in (hi, lo):
                cands.append(torch.stack([cx[:, 0], cy[:, 1], cz[:, 2]], dim=1))
                valid.append(torch.ones(m, dtype=torch.bool, device=q.device))
    p = torch.stack(cands, dim=1)  # [m, 26, 3]
    ph = torch.cat([p, torch.ones(m, p.shape[1], 1, dtype=q.dtype, device=q.device)], dim=2)
    row_q = _dot4(ph.unsqueeze(2), q.transpose(1, 2).unsqueeze(1))  # [m, 26, 4]: (p^T Q)_j, in Eigen's order
    err = _dot4(row_q, ph)
    err = torch.where(torch.stack(valid, dim=1) & ~torch.isnan(err), err, torch.full_like(err, float("inf")))
    x = x.clone()
    x[out] = p[torch.arange(m, device=q.device), err.argmin(dim=1)]
    return x


def _qr_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [M, n] with A x = b for batched float32 2x2 or 3x3 systems (a [M, n, n], b [M, n]), exactly as Eigen 3.4's
    ColPivHouseholderQR<Matrix{2,3}f>::solve computes it: columns pivoted by (down-dated) norm, Householder
    reflections (makeHouseholder / applyHouseholderOnTheLeft), back substitution, pivots undone. Its rank cut-off
    for near-singular systems is not modelled: the regularisation keeps the QEFs far from singular."""
    m, n = b.shape
    rows = torch.arange(m, device=b.device)
    a = a.clone()
    c = b.clone()
    direct = _sqrt32(_unrolled_sum([a[:, i] * a[:, i] for i in range(n)]))  # [M, n] column norms
    updated = direct.clone()
    perm = torch.arange(n, device=b.device).expand(m, n).clone()
    threshold = math.sqrt(torch.finfo(torch.float32).eps)
    reflectors = []
    for k in range(n):
        pick = k + updated[:, k:].argmax(dim=1)  # the first of equal maxima, as Eigen's maxCoeff
        swap = torch.arange(n, device=b.device).expand(m, n).clone()
        swap[rows, k], swap[rows, pick] = pick, k
        a = a.gather(2, swap.unsqueeze(1).expand(m, n, n))
        updated, direct, perm = updated.gather(1, swap), direct.gather(1, swap), perm.gather(1, swap)
        c0, tail = a[:, k, k], a[:, k + 1:, k]
        if tail.shape[1] == 0:  # the last column: no reflection (tau = 0)
            reflectors.append(None)
            break
        tail_sq = _running_sum([tail[:, i] * tail[:, i] for i in range(tail.shape[1])])
        reflect = tail_sq > torch.finfo(torch.float32).tiny
        beta = _sqrt32(c0 * c0 + tail_sq)
        beta = torch.where(c0 >= 0, -beta, beta)
        essential = tail / (c0 - beta).unsqueeze(1)
        tau = (beta - c0) / beta
        reflectors.append((reflect, essential, tau))
        a[:, k, k] = torch.where(reflect, beta, c0)
        a[:, k:, k + 1:] = _reflect(a[:, k:, k + 1:], reflect, essential, tau)
        ratio = a[:, k, k + 1:].abs() / updated[:, k + 1:]  # LAPACK-style norm down-date of the other columns
        ratio = ((1 + ratio) * (1 - ratio)).clamp_min(0)
        scale = updated[:, k + 1:] / direct[:, k + 1:]
        stale = ratio * (scale * scale) <= threshold
        below = a[:, k + 1:, k + 1:]
        fresh = _sqrt32(_running_sum([below[:, i] * below[:, i] for i in range(below.shape[1])]))
        live = updated[:, k + 1:] != 0
        direct[:, k + 1:] = torch.where(live & stale, fresh, direct[:, k + 1:])
        updated[:, k + 1:] = torch.where(live, torch.where(stale, fresh, updated[:, k + 1:] * _sqrt32(ratio)),
                                         updated[:, k + 1:])
    for k, h in enumerate(reflectors):
        if h is not None:
            c[:, k:] = _reflect(c[:, k:].unsqueeze(2), *h).squeeze(2)
    x = torch.empty_like(c)
    for i in range(n - 1, -1, -1):
        x[:, i] = torch.where(c[:, i] != 0, c[:, i] / a[:, i, i], c[:, i])
        c[:, :i] = c[:, :i] - x[:, i:i + 1] * a[:, :i, i]
    return torch.empty_like(x).scatter_(1, perm, x)


def _reflect(block: torch.Tensor, mask: torch.Tensor, essential: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Eigen's applyHouseholderOnTheLeft on block [M, r, c] (row 0 on the reflector's pivot): tmp = v . column,
    top -= tau tmp, rest -= (tau v) tmp, with v = (1, essential); rows where `mask` is False stay (tau = 0)."""
    top, bottom = block[:, 0], block[:, 1:]
    tmp = _running_sum([essential[:, i:i + 1] * bottom[:, i] for i in range(bottom.shape[1])]) + top
    new_top = top - tau.unsqueeze(1) * tmp
    new_bottom = bottom - (tau.unsqueeze(1) * essential).unsqueeze(2) * tmp.unsqueeze(1)
    out = torch.cat([new_top.unsqueeze(1), new_bottom], dim=1)
    return torch.where(mask.view(-1, 1, 1), out, block)


def _unrolled_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """Eigen's unrolled reduction of a fixed-size vector: halves summed recursively (t0 + (t1 + t2) for 3)."""
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return _unrolled_sum(terms[:half]) + _unrolled_sum(terms[half:])


def _running_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """Eigen's reduction of a short dynamic-size vector: left to right."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
