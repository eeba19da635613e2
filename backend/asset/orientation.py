"""One consistent winding per connected piece, and which way each piece faces.

The decoded dual-grid mesh is not consistently oriented (spec §7.1 step 5: each quad keeps a fixed per-axis
corner order); the manifold repair, the simplifier's flip test, the normals and the chart clustering all need
it to be. The rule for which side is the front:

* a closed piece faces outwards: its signed volume is positive;
* an open piece faces the side that is seen from outside the object: a few of its faces (up to
  `VISIBILITY_SAMPLES`, spread over the piece) cast a ray along each of their two normals through a coarse
  occupancy grid of the whole mesh, and the side whose rays escape more often (area-weighted) wins: the
  convex side of a bowl, the outer side of a sheet lying on a body;
* an open piece seen equally from both sides (a lone flat sheet) faces up (+Z), and one standing upright faces
  away from the centre of the object's bounding box.
"""

from __future__ import annotations

import math

import torch

from backend.asset.meshutil import boundary_sides, edges_of, face_normals, manifold_side_pairs
from backend.ovoxel.segments import INT64_MAX

VISIBILITY_GRID = 128  # occupancy cells along the object's longest side (at most; cells are at least an edge long)
VISIBILITY_SAMPLES = 64  # faces per open piece that cast rays
TIE = 0.02  # a vote decides when it is at least this fraction of the area voting


def consistent_winding(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(faces re-wound so neighbours across every manifold edge agree, piece label per face).

    Parallel union-find with parity: a face's flip bit relative to its root is kept along the parent links.
    Two faces whose shared edge runs the same way in both must have opposite flip bits. Roots hook under the
    smallest neighbouring root with the parity that satisfies one such constraint; pointer jumping composes
    parities. Constraints that contradict the tree (non-orientable loops) are ignored. A piece is a set of
    faces connected through manifold edges.
    """
    f = faces.long()
    nf = f.shape[0]
    sides = manifold_side_pairs(edges_of(f, vertices.shape[0]))
    fa, fb = sides[:, 0] // 3, sides[:, 1] // 3
    start = f.reshape(-1)
    same_direction = start[sides[:, 0]] == start[sides[:, 1]]

    parent = torch.arange(nf, device=f.device)
    parity = torch.zeros(nf, dtype=torch.long, device=f.device)
    while True:
        while True:  # flatten, composing parities along the way
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parity = parity ^ parity[parent]
            parent = grand
        ra, rb = parent[fa], parent[fb]
        cross = ra != rb
        if not bool(cross.any()):
            break
        high, low = torch.maximum(ra, rb)[cross], torch.minimum(ra, rb)[cross]
        bit = (parity[fa] ^ parity[fb] ^ same_direction.long())[cross]
        best = torch.full((nf,), INT64_MAX, dtype=torch.long, device=f.device)
        best.scatter_reduce_(0, high, low * 2 + bit, "amin")
        hooked = best != INT64_MAX
        parent = torch.where(hooked, best // 2, parent)
        parity = torch.where(hooked, best % 2, parity)
    wound = torch.where(parity.bool().unsqueeze(1), f[:, [0, 2, 1]], f)
    return wound.to(faces.dtype), parent


def _per_piece(values: torch.Tensor, piece: torch.Tensor, num: int) -> torch.Tensor:
    return torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(0, piece, values)


def _escapes(occupied: torch.Tensor, origin: torch.Tensor, cell: float, start: torch.Tensor,
             direction: torch.Tensor) -> torch.Tensor:
    """Whether rays from `start` along unit `direction` leave the grid without entering an occupied cell."""
    dims = torch.tensor(occupied.shape, device=start.device)
    steps = int(math.ceil(2 * math.sqrt(3) * float(dims.max()))) + 2
    free = torch.ones(start.shape[0], dtype=torch.bool, device=start.device)
    chunk = 32
    for first in range(0, steps, chunk):
        t = (torch.arange(first, min(first + chunk, steps), device=start.device, dtype=start.dtype) * 0.5 * cell)
        points = start.unsqueeze(1) + t.reshape(1, -1, 1) * direction.unsqueeze(1)  # [M, S, 3]
        index = ((points - origin) / cell).floor().long()
        inside = ((index >= 0) & (index < dims)).all(dim=2)
        index = torch.minimum(index.clamp_min(0), dims - 1)
        hit = occupied[index[..., 0], index[..., 1], index[..., 2]] & inside
        free &= ~hit.any(dim=1)
        if not bool(inside.any()):
            break
    return free


def _visibility_votes(vertices: torch.Tensor, faces: torch.Tensor, piece: torch.Tensor, open_piece: torch.Tensor,
                      unit: torch.Tensor, area: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vote, votes cast) per piece: area of sampled faces seen from outside only on their front side, minus
    those seen only on their back side; and the area of all sampled faces."""
    num = piece.numel()
    candidates = torch.nonzero(open_piece[piece]).squeeze(1)
    if candidates.numel() == 0:
        return vertices.new_zeros(num), vertices.new_zeros(num)
    order = candidates[torch.argsort(piece[candidates], stable=True)]
    owner = piece[order]
    size = torch.bincount(owner, minlength=num)
    rank = torch.arange(order.numel(), device=order.device) - (torch.cumsum(size, 0) - size)[owner]
    stride = torch.div(size + VISIBILITY_SAMPLES - 1, VISIBILITY_SAMPLES, rounding_mode="floor").clamp_min(1)
    sample = order[rank % stride[owner] == 0]

    lo, hi = vertices.amin(dim=0), vertices.amax(dim=0)
    tri = vertices[faces.long()]
    # Cells no smaller than a typical edge, so the marks below (corners, edge midpoints, centroids) leave no gaps.
    edge = float((tri - tri.roll(1, dims=1)).norm(dim=2).median())
    cell = max(float((hi - lo).max()) / VISIBILITY_GRID, edge) or 1.0
    origin = lo - cell
    dims = ((hi - origin) / cell).floor().long() + 2
    occupied = torch.zeros(*dims.tolist(), dtype=torch.bool, device=vertices.device)
    marks = torch.cat([vertices, tri.mean(dim=1), 0.5 * (tri + tri.roll(1, dims=1)).reshape(-1, 3)])
    cells = ((marks - origin) / cell).floor().long()
    occupied[cells[:, 0], cells[:, 1], cells[:, 2]] = True

    centre = tri[sample].mean(dim=1)
    n = unit[sample]
    front = _escapes(occupied, origin, cell, centre + 1.5 * cell * n, n)
    back = _escapes(occupied, origin, cell, centre - 1.5 * cell * n, -n)
    a = area[sample]
    vote = _per_piece(a * (front.to(a.dtype) - back.to(a.dtype)), piece[sample], num)
    return vote, _per_piece(a, piece[sample], num)


def orient_outward(vertices: torch.Tensor, faces: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """Faces of each consistently wound piece (label per face, < F) turned to face by the module's rule."""
    f = faces.long()
    nf = f.shape[0]
    if nf == 0:
        return faces
    p = vertices.double()
    n = face_normals(p, f)
    area = 0.5 * n.norm(dim=1)
    unit = n / (2 * area).clamp_min(1e-300).unsqueeze(1)
    # Signed volume per piece, about the piece's centroid.
    tri = p[f]
    count = _per_piece(torch.ones_like(area), piece, nf)
    centroid = torch.zeros(nf, 3, dtype=p.dtype, device=p.device).index_add_(0, piece, tri.mean(dim=1))
    centroid = centroid / count.clamp_min(1).unsqueeze(1)
    q = tri - centroid[piece].unsqueeze(1)
    volume = _per_piece((q[:, 0] * torch.linalg.cross(q[:, 1], q[:, 2])).sum(dim=1), piece, nf)

    side = boundary_sides(f, vertices.shape[0])[0]
    open_piece = torch.zeros(nf, dtype=torch.bool, device=f.device)
    open_piece[piece[side // 3]] = True
    vote, cast = _visibility_votes(p, f, piece, open_piece, unit, area)
    up = _per_piece(area * unit[:, 2], piece, nf)
    middle = 0.5 * (p.amin(dim=0) + p.amax(dim=0))
    away = _per_piece(area * (unit * (tri.mean(dim=1) - middle)).sum(dim=1), piece, nf)
    total = _per_piece(area, piece, nf)
    score = torch.where(vote.abs() >= TIE * cast.clamp_min(1e-300), vote,
                        torch.where(up.abs() >= TIE * total, up, away))
    score = torch.where(open_piece, score, volume)
    flip = (score < 0)[piece]
    return torch.where(flip.unsqueeze(1), f[:, [0, 2, 1]], f).to(faces.dtype)


def unify_orientation(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Faces consistently wound across manifold edges, each piece facing by the module's rule."""
    if faces.shape[0] == 0:
        return faces
    wound, piece = consistent_winding(vertices, faces)
    return orient_outward(vertices, wound, piece)
