"""Remeshing by dual contouring of a narrow band of the unsigned distance field (spec §7.4 Branch B).

The iso-surface UDF = band x voxel_size around the reference surface is a closed shell (both sides of open sheets,
inner and outer offsets of closed parts), so remeshing trades the decoded mesh's holes and non-manifold spots for
clean topology (dual contouring may still leave a rare non-manifold edge where the shell is thinner than a cell;
manifold.make_manifold resolves those). Simpler than the reference's coarse-to-fine band: the band is just the cells
within two cells of a reference vertex (the shell is one voxel off the surface, and the dual-grid vertices lie
inside their voxels up to half a voxel out), and the UDF comes from the exact closest-point search used for baking.
The dual vertex of a cell is the mean of its edges' zero crossings; each sign-changing lattice edge gives a quad
over its 4 cells, wound so normals point to positive UDF - band (out of the shell), and split along the diagonal
whose triangles' normals agree best.
"""

from __future__ import annotations

import torch

from backend.ovoxel.dual_grid import QUAD_OFFSETS
from backend.asset.meshutil import compact, face_normals
from backend.ovoxel.nearest import closest_points
from backend.native import VoxelIndex

NEIGHBOURS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
CELL_CORNERS = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])
# The 12 cell edges as pairs of CELL_CORNERS rows (corners differing in one bit).
CELL_EDGES = torch.tensor([[i, i | (1 << a)] for a in range(3) for i in range(8) if not i & (1 << a)])


def _unique_rows(cells: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(cells, dim=0, return_inverse=True) through 1-D keys (non-negative coordinates < stride)."""
    keys, inverse = torch.unique((cells[:, 0] * stride + cells[:, 1]) * stride + cells[:, 2], return_inverse=True)
    return torch.stack([keys // stride**2, keys // stride % stride, keys % stride], dim=1), inverse


def _dilate(cells: torch.Tensor, stride: int) -> torch.Tensor:
    return _unique_rows((cells.unsqueeze(1) + NEIGHBOURS.to(cells.device)).reshape(-1, 3), stride)[0]


def remesh_narrow_band(vertices: torch.Tensor, faces: torch.Tensor, resolution: int, band: float = 1.0,
                       origin: float = -0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices, faces) of the shell at distance band / resolution around the mesh, on the voxel grid."""
    device = vertices.device
    h = 1.0 / resolution
    eps = band * h
    # Grid cells shifted by 4 so the band (2 cells around the surface, plus corners) stays non-negative.
    shift, stride = 4, resolution + 10
    seed = ((vertices - origin) / h).floor().long().clamp(-2, resolution + 1) + shift
    cells = _dilate(_dilate(_unique_rows(seed, stride)[0], stride), stride)
    index = VoxelIndex(cells)

    corner_cells = (cells.unsqueeze(1) + CELL_CORNERS.to(device)).reshape(-1, 3)
    lattice, corner_of = _unique_rows(corner_cells, stride)
    corner_of = corner_of.reshape(-1, 8)
    points = (lattice - shift).to(vertices.dtype) * h + origin
    distance = closest_points(vertices, faces, points, eps + h, max_radius=eps + h).distance  # an edge is h long
    s = distance - eps  # < 0 inside the shell

    # Dual vertex per cell: mean of the zero crossings on its 12 edges.
    e0, e1 = corner_of[:, CELL_EDGES[:, 0].to(device)], corner_of[:, CELL_EDGES[:, 1].to(device)]  # [C, 12]
    s0, s1 = s[e0], s[e1]
    crossing = (s0 < 0) != (s1 < 0)
    t = (s0 / torch.where(crossing, s0 - s1, torch.ones_like(s0))).clamp(0, 1)
    p = points[e0] + t.unsqueeze(-1) * (points[e1] - points[e0])
    count = crossing.sum(dim=1)
    dual = (p * crossing.unsqueeze(-1)).sum(dim=1) / count.clamp_min(1).unsqueeze(1)

    # Quads: the lattice edge at each cell's upper corner in the two other axes, if its sign changes.
    quads = []
    for axis in range(3):
        lower = torch.ones(3, dtype=torch.long, device=device)
        lower[axis] = 0
        bit_lower = int((lower * torch.tensor([1, 2, 4], device=device)).sum())
        bit_upper = bit_lower | (1 << axis)
        sa, sb = s[corner_of[:, bit_lower]], s[corner_of[:, bit_upper]]
        flagged = torch.nonzero((sa < 0) != (sb < 0)).squeeze(1)
        ring = index.lookup((cells[flagged].unsqueeze(1) + QUAD_OFFSETS[axis].to(device)).reshape(-1, 3)).reshape(-1, 4)
        ok = (ring >= 0).all(dim=1)
        ring, inside_first = ring[ok], (sa[flagged] < 0)[ok]
        quads.append(torch.where(inside_first.unsqueeze(1), ring.flip(1), ring))
    quads = torch.cat(quads)
    tri_02 = quads[:, [0, 1, 2, 0, 2, 3]].reshape(-1, 2, 3)
    tri_13 = quads[:, [0, 1, 3, 1, 2, 3]].reshape(-1, 2, 3)

    def agreement(tris: torch.Tensor) -> torch.Tensor:
        n = face_normals(dual, tris.reshape(-1, 3)).reshape(-1, 2, 3)
        n = n / n.norm(dim=2, keepdim=True).clamp_min(1e-30)
        return (n[:, 0] * n[:, 1]).sum(dim=1)

    use_02 = agreement(tri_02) >= agreement(tri_13)
    tris = torch.where(use_02.reshape(-1, 1, 1), tri_02, tri_13).reshape(-1, 3)
    return compact(dual.to(vertices.dtype), tris.to(faces.dtype))
