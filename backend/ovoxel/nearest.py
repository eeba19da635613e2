"""Closest point on a triangle mesh, by a uniform grid of cells each listing the triangles near it.

A triangle is listed in every cell that its bounding box, grown by a search radius r, overlaps. Every triangle
closer than r to a query point is therefore listed in the query's own cell, so the best candidate there is the
exact nearest triangle whenever it lies within r. Points left farther away are asked again with a 4x radius.
The texel positions baking projects sit within about a voxel of the surface, so nearly all resolve in the
first round with a few dozen candidates each. Built and queried with whole-tensor ops: the same code is the
CPU path and the GPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.ovoxel.segments import expand_segments, segment_argmin


def closest_on_triangles(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Barycentric weights [M, 3] of the point of triangle (a, b, c) closest to p (Voronoi-region test).

    Regions are tested in order vertex A, vertex B, edge AB, vertex C, edge AC, edge BC, interior; a degenerate
    triangle falls into one of its vertex or edge regions, so no division by zero reaches the result.
    """
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    bp = p - b
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    cp = p - c
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    tiny = torch.finfo(p.dtype).tiny

    denom = (va + vb + vc)
    denom = torch.where(denom.abs() > tiny, denom, torch.ones_like(denom))
    v, w = vb / denom, vc / denom
    out = torch.stack([1 - v - w, v, w], dim=1)

    def put(mask: torch.Tensor, weights: torch.Tensor) -> None:
        nonlocal out
        out = torch.where(mask.unsqueeze(1), weights, out)

    zero = torch.zeros_like(d1)
    e_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6)).clamp_min(tiny)
    put((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), torch.stack([zero, 1 - e_bc, e_bc], 1))
    e_ac = d2 / (d2 - d6).clamp_min(tiny)
    put((vb <= 0) & (d2 >= 0) & (d6 <= 0), torch.stack([1 - e_ac, zero, e_ac], 1))
    put((d6 >= 0) & (d5 <= d6), torch.stack([zero, zero, zero + 1], 1))
    e_ab = d1 / (d1 - d3).clamp_min(tiny)
    put((vc <= 0) & (d1 >= 0) & (d3 <= 0), torch.stack([1 - e_ab, e_ab, zero], 1))
    put((d3 >= 0) & (d4 <= d3), torch.stack([zero, zero + 1, zero], 1))
    put((d1 <= 0) & (d2 <= 0), torch.stack([zero + 1, zero, zero], 1))
    return out


@dataclass
class Closest:
    face: torch.Tensor  # long [M]
    bary: torch.Tensor  # [M, 3]
    point: torch.Tensor  # [M, 3]
    distance: torch.Tensor  # [M]


class TriangleGrid:
    """Triangles listed per cell of a uniform grid, for queries within radius r.

    Cells of max(1.5 r, typical triangle extent) balance the two costs: a triangle is listed in about
    ((extent + 2 r) / cell + 1)^3 cells, and a query scans every triangle listed in its cell.
    """

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, radius: float, cell_factor: float = 1.5) -> None:
        self.vertices, self.faces, self.radius = vertices, faces.long(), float(radius)
        tri = vertices[self.faces]
        lo, hi = tri.amin(dim=1) - radius, tri.amax(dim=1) + radius
        extent = float((hi - lo).amax(dim=1).median()) - 2 * radius if faces.shape[0] else 0.0
        self.cell = max(cell_factor * radius, extent, 1e-9)
        self.origin = lo.amin(dim=0) if faces.shape[0] else vertices.new_zeros(3)
        c_lo = ((lo - self.origin) / self.cell).floor().long()
        c_hi = ((hi - self.origin) / self.cell).floor().long()
        self.dims = (c_hi.amax(dim=0) + 1 if faces.shape[0] else c_hi.new_ones(3)).clamp_min(1)
        span = c_hi - c_lo + 1
        count = span.prod(dim=1)
        face, local = expand_segments(count)
        s = span[face]
        offset = torch.stack([local // (s[:, 1] * s[:, 2]), local // s[:, 2] % s[:, 1], local % s[:, 2]], dim=1)
        self.keys, order = torch.sort(self._key(c_lo[face] + offset))
        self.cell_faces = face[order]

    def _key(self, cell: torch.Tensor) -> torch.Tensor:
        return (cell[:, 0] * self.dims[1] + cell[:, 1]) * self.dims[2] + cell[:, 2]

    def query(self, points: torch.Tensor) -> Closest:
        """Nearest listed triangle per point; face -1 and distance inf where the cell lists none."""
        m = points.shape[0]
        max_pairs = 1 << 24 if points.is_cuda else 1 << 22  # candidates per chunk: bounds the temporaries
        cell = ((points - self.origin) / self.cell).floor().long()
        inside = ((cell >= 0) & (cell < self.dims)).all(dim=1)
        key = torch.where(inside, self._key(cell.clamp_min(0)), torch.full_like(cell[:, 0], -1))
        start = torch.searchsorted(self.keys, key)
        count = torch.where(inside, torch.searchsorted(self.keys, key, right=True) - start, 0)
        face = torch.full((m,), -1, dtype=torch.long, device=points.device)
        bary = points.new_zeros(m, 3)
        ends = torch.cumsum(count, 0)
        first = 0
        while first < m:  # chunks of queries with at most max_pairs candidates in all
            base = int(ends[first - 1]) if first else 0
            last = max(first + 1, int(torch.searchsorted(ends, base + max_pairs, right=True)))
            last = min(last, m)
            n = count[first:last]
            owner, local = expand_segments(n)
            owner = owner + first
            if owner.numel():
                cand = self.cell_faces[start[owner] + local]
                tri = self.vertices[self.faces[cand]]
                w = closest_on_triangles(points[owner], tri[:, 0], tri[:, 1], tri[:, 2])
                q = (w.unsqueeze(2) * tri).sum(dim=1)
                d2 = ((q - points[owner]) ** 2).sum(dim=1)
                best = segment_argmin(d2, owner - first, last - first)
                hit = best >= 0
                face[first:last][hit] = cand[best[hit]]
                bary[first:last][hit] = w[best[hit]].to(bary.dtype)
            first = last
        found = face >= 0
        tri = self.vertices[self.faces[face.clamp_min(0)]]
        point = (bary.unsqueeze(2) * tri).sum(dim=1)
        distance = torch.where(found, (point - points).norm(dim=1), torch.full_like(point[:, 0], float("inf")))
        return Closest(face, bary, point, distance)


def closest_points(vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor, radius: float,
                   max_radius: float | None = None) -> Closest:
    """Exact closest point on the mesh for every query, growing the search radius 4x for those left over.

    With `max_radius`, points farther than that from the mesh stay unresolved (face -1, distance inf): the
    remesher only needs distances near its iso-level, and far points would cost the most.
    """
    m = points.shape[0]
    result = Closest(torch.full((m,), -1, dtype=torch.long, device=points.device), points.new_zeros(m, 3),
                     points.clone(), torch.full((m,), float("inf"), dtype=points.dtype, device=points.device))
    todo = torch.arange(m, device=points.device)
    span = float((vertices.amax(dim=0) - vertices.amin(dim=0)).norm()) + float(
        (points.amax(dim=0) - points.amin(dim=0)).norm()) if m else 0.0
    r = float(radius)
    while todo.numel():
        last = r >= span or (max_radius is not None and r >= max_radius)
        if max_radius is not None:
            r = min(r, float(max_radius))
        found = TriangleGrid(vertices, faces, r).query(points[todo])
        done = found.distance <= r
        if last:  # every triangle is within reach, or no farther one is wanted: what was found is final
            done = torch.ones_like(done)
        for name in ("face", "bary", "point", "distance"):
            getattr(result, name)[todo[done]] = getattr(found, name)[done]
        todo = todo[~done]
        r *= 4
    return result
