"""Turning the decoded surface into a 2-manifold: every edge on at most two faces, every vertex one fan.

The dual-grid surface is not one: where parts touch or cross, or a part is thinner than a voxel, several sheets
share voxels and so share dual vertices and edges (edges with 3-4 faces, vertices where fans meet at a point).
We keep every face and resolve each such spot by choosing which faces stay joined (a *sheet* below is a set of
faces connected through consistently wound manifold edges):

* An edge with an odd number of faces (> 2) from more than one sheet is a sheet ending on a surface: the contact
  face of two touching parts, or a part thinner than a voxel whose two sides share one sheet. The smallest sheet at
  such an edge is doubled, so each side gets its own copy and both close: a reversed copy where the surfaces on
  either side of the sheet face opposite ways (touching parts, thin parts: the copies fold into each other along the
  sheet's free border), a same-facing copy where they face the same way (tangent surfaces).
* Around a non-manifold edge the faces are sorted by angle about the edge. Two faces next to each other may be
  joined when they run the edge in opposite directions (so the winding stays consistent). First the pairs whose
  normals both point away from the wedge between them (the wedge is inside the solid: touching parts come apart
  along it), then, among the faces left, neighbours whose normals both point into their wedge (the wedge is
  outside: crossing sheets reconnect into the outer and the inner surface), and so on alternately among the
  faces still left. Faces left unpaired (all running the edge the same way) are cut loose along that edge (a
  boundary, for hole filling to close).
* A manifold edge whose two faces run it the same way (a non-orientable seam) is cut too.
* Each vertex is then split into one copy per fan of corners that stay joined across edges (a fan that closes
  through one edge twice has that edge's joins cut, and is split again).

Faces keep their corners' positions, so split copies and doubled sheets coincide until `separate_coincident`
moves them a little apart (for tools that weld vertices by position). The input must be consistently wound
where it is manifold (orientation.unify_orientation) for the angular pairing to know inside from outside.
"""

from __future__ import annotations

import torch

from backend.asset.meshutil import Edges, connected_components, edges_of, face_normals
from backend.ovoxel.segments import segment_argmin


def _side_directions(faces: torch.Tensor, edges: Edges, sides: torch.Tensor) -> torch.Tensor:
    """+1 where side 3f + k runs its edge from the lower vertex id to the higher, else -1."""
    start = faces.reshape(-1)[sides]
    low = edges.pairs[edges.of_side.reshape(-1)[sides], 0]
    return torch.where(start == low, 1, -1)


def _group_by_edge(edges: Edges, sides: torch.Tensor) -> torch.Tensor:
    """The sides sorted by edge, as [n, 2] (for edges with exactly two of them)."""
    side_edge = edges.of_side.reshape(-1)
    return sides[torch.argsort(side_edge[sides], stable=True)].reshape(-1, 2)


def _pair_around(vertices: torch.Tensor, faces: torch.Tensor, edges: Edges, sides: torch.Tensor) -> torch.Tensor:
    """[P, 2] side pairs to keep joined among `sides`, grouped around their edges by angle (module docstring)."""
    if sides.numel() == 0:
        return sides.new_zeros(0, 2)
    edge = edges.of_side.reshape(-1)[sides]
    lo, hi = edges.pairs[edge, 0], edges.pairs[edge, 1]
    p = vertices.double()
    axis = p[hi] - p[lo]
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-300)
    helper = torch.zeros_like(axis)
    use_x = axis[:, 0].abs() < 0.9
    helper[use_x, 0] = 1.0
    helper[~use_x, 1] = 1.0
    u1 = helper - (helper * axis).sum(dim=1, keepdim=True) * axis
    u1 = u1 / u1.norm(dim=1, keepdim=True)
    u2 = torch.linalg.cross(axis, u1)
    f, k = sides // 3, sides % 3
    apex = p[faces[f, (k + 2) % 3]] - p[lo]
    angle = torch.atan2((apex * u2).sum(dim=1), (apex * u1).sum(dim=1))
    direction = _side_directions(faces, edges, sides)
    # By edge, then angle; a reversed copy shares its sheet's angle and the forward-running one goes first.
    order = torch.argsort(-direction, stable=True)
    order = order[torch.argsort(angle[order], stable=True)]
    order = order[torch.argsort(edge[order], stable=True)]
    sides, edge, direction = sides[order], edge[order], direction[order]

    def successor(members: torch.Tensor) -> torch.Tensor:
        """Position (into `members`) of the cyclic successor of each member within its edge's group."""
        group = edge[members]
        size = torch.bincount(group, minlength=edges.count.numel())
        start = torch.cumsum(size, 0) - size
        rank = torch.arange(members.numel(), device=members.device) - start[group]
        return start[group] + (rank + 1) % size[group]

    # Rounds alternate between the two kinds of pair, each among the faces still unpaired (so a later pair may
    # span earlier ones), until no more form: what is left at an edge runs it all the same way.
    rest = torch.arange(sides.numel(), device=sides.device)
    pairs = []
    first, idle = -1, 0
    while rest.numel() > 1 and idle < 2:
        succ = rest[successor(rest)]
        # first = -1: both normals point away from the wedge to the successor; +1: both point into it.
        take = (direction[rest] == first) & (direction[succ] == -first) & (succ != rest)
        idle = 0 if bool(take.any()) else idle + 1
        pairs.append(torch.stack([sides[rest[take]], sides[succ[take]]], dim=1))
        paired = torch.zeros(sides.numel(), dtype=torch.bool, device=sides.device)
        paired[rest[take]] = True
        paired[succ[take]] = True
        rest = rest[~paired[rest]]
        first = -first
    return torch.cat(pairs) if pairs else sides.new_zeros(0, 2)


def _consistent(faces: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mask of side pairs that run their edge in opposite directions."""
    start = faces.reshape(-1)
    return start[pairs[:, 0]] != start[pairs[:, 1]]


def _doubled_sheets(vertices: torch.Tensor, faces: torch.Tensor, edges: Edges
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(faces [D] to double, whether each copy is reversed [D]): the smallest sheet at every odd edge."""
    side_edge = edges.of_side.reshape(-1)
    count = edges.count[side_edge]
    odd_sides = torch.nonzero((count > 2) & (count % 2 == 1)).squeeze(1)
    if odd_sides.numel() == 0:
        return odd_sides, odd_sides.bool()
    nf = faces.shape[0]
    manifold = _group_by_edge(edges, torch.nonzero(count == 2).squeeze(1))
    manifold = manifold[_consistent(faces, manifold)]
    sheet = connected_components(nf, manifold[:, 0] // 3, manifold[:, 1] // 3)
    # Only where the edge's faces come from different sheets: three faces of one sheet are a fold, not a junction.
    pair_key = torch.unique(side_edge[odd_sides] * nf + sheet[odd_sides // 3])
    sheets_at = torch.bincount(pair_key // nf, minlength=edges.count.numel())
    odd_sides = odd_sides[sheets_at[side_edge[odd_sides]] >= 2]
    if odd_sides.numel() == 0:
        return odd_sides, odd_sides.bool()
    area = 0.5 * face_normals(vertices.double(), faces).norm(dim=1)
    sheet_area = torch.zeros(nf, dtype=area.dtype, device=area.device).index_add_(0, sheet, area)
    odd_edge, slot = torch.unique(side_edge[odd_sides], return_inverse=True)
    chosen = odd_sides[segment_argmin(sheet_area[sheet[odd_sides // 3]], slot, odd_edge.numel())]
    # Reversed copy when the other faces at the edge run it both ways (sum of their directions ~ 0).
    direction = _side_directions(faces, edges, odd_sides)
    total = torch.zeros(odd_edge.numel(), dtype=torch.long, device=faces.device).index_add_(0, slot, direction)
    others = total - _side_directions(faces, edges, chosen)
    tangent = others.abs() == edges.count[odd_edge] - 1
    vote = torch.zeros(nf, dtype=torch.long, device=faces.device).index_add_(
        0, sheet[chosen // 3], torch.where(tangent, -1, 1))
    doubled = torch.zeros(nf, dtype=torch.bool, device=faces.device)
    doubled[sheet[chosen // 3]] = True
    rows = torch.nonzero(doubled[sheet]).squeeze(1)
    return rows, vote[sheet[rows]] >= 0


def make_manifold(vertices: torch.Tensor, faces: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vertices, faces, origin) with every edge on at most two consistently wound faces and every vertex a
    single fan; origin [V'] is the input vertex each output vertex copies. `faces` must be free of degenerate
    and duplicate faces; copies of doubled sheets follow the input's faces."""
    f = faces.long()
    nf = f.shape[0]
    if nf == 0:
        return vertices, faces, torch.arange(vertices.shape[0], device=vertices.device)
    edges = edges_of(f, vertices.shape[0])
    rows, reversed_copy = _doubled_sheets(vertices, f, edges)
    copies = torch.where(reversed_copy.unsqueeze(1), f[rows][:, [0, 2, 1]], f[rows])
    f_all = torch.cat([f, copies])
    edges_all = edges_of(f_all, vertices.shape[0])
    side_edge = edges_all.of_side.reshape(-1)
    original_sides = torch.zeros(edges_all.count.numel(), dtype=torch.long, device=f.device).index_add_(
        0, side_edge[: 3 * nf], torch.ones(3 * nf, dtype=torch.long, device=f.device))

    # Copy side of each original side of a doubled face (reversed copies run their sides backwards).
    copy_of = torch.full((nf,), -1, dtype=torch.long, device=f.device)
    copy_of[rows] = nf + torch.arange(rows.numel(), device=f.device)
    flip_of = torch.zeros(nf, dtype=torch.bool, device=f.device)
    flip_of[rows] = reversed_copy

    def copy_side(s: torch.Tensor) -> torch.Tensor:
        k = s % 3
        return 3 * copy_of[s // 3] + torch.where(flip_of[s // 3], (2 - k) % 3, k)

    # Edges manifold in the input: the original pair, and the copies' pair when the sheet was doubled.
    manifold = _group_by_edge(edges_all, torch.nonzero((original_sides[side_edge] == 2)
                                                       & (torch.arange(3 * f_all.shape[0], device=f.device)
                                                          < 3 * nf)).squeeze(1))
    manifold = manifold[_consistent(f_all, manifold)]
    both = (copy_of[manifold[:, 0] // 3] >= 0) & (copy_of[manifold[:, 1] // 3] >= 0)
    copied = torch.stack([copy_side(manifold[both, 0]), copy_side(manifold[both, 1])], dim=1)
    # Free borders of doubled sheets: the sheet and its copy fold into each other when wound oppositely.
    border = _group_by_edge(edges_all, torch.nonzero((original_sides[side_edge] == 1)
                                                     & (edges_all.count[side_edge] == 2)).squeeze(1))
    border = border[_consistent(f_all, border)]
    around = _pair_around(vertices, f_all, edges_all, torch.nonzero(original_sides[side_edge] > 2).squeeze(1))
    joined = torch.cat([manifold, copied, border, around])
    while True:
        v, new_faces, origin = split_at_fans(vertices, f_all, joined)
        # A fan that closes into a cycle through an edge twice leaves that edge on 4 faces: cut its joins.
        split_edges = edges_of(new_faces, v.shape[0])
        crowded = split_edges.count[split_edges.of_side.reshape(-1)] > 2
        if not bool(crowded.any()):
            return v, new_faces.to(faces.dtype), origin
        joined = joined[~(crowded[joined[:, 0]] | crowded[joined[:, 1]])]


def corner_fans(faces: torch.Tensor, joined: torch.Tensor) -> torch.Tensor:
    """Fan label [3F] per face corner (index 3f + k): corners at one vertex share a label when their faces are
    linked through joined side pairs (each running its edge in opposite directions) around that vertex."""
    s1, s2 = joined[:, 0], joined[:, 1]

    def end(s: torch.Tensor) -> torch.Tensor:  # the corner a side ends at
        return s - s % 3 + (s % 3 + 1) % 3

    # s1 runs a -> b and s2 runs b -> a: the corners at a are s1's start and s2's end, and the other way round.
    return connected_components(faces.numel(), torch.cat([s1, end(s1)]), torch.cat([end(s2), s2]))


def split_at_fans(vertices: torch.Tensor, faces: torch.Tensor, joined: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vertices, faces, origin): one vertex per corner fan; origin [V'] is the input vertex each copy comes from."""
    label = corner_fans(faces, joined)
    roots, new_id = torch.unique(label, return_inverse=True)
    origin = faces.reshape(-1)[roots]
    return vertices[origin], new_id.reshape(-1, 3).to(faces.dtype), origin


def separate_coincident(vertices: torch.Tensor, faces: torch.Tensor, distance: float) -> torch.Tensor:
    """Vertices moved so that no two share a position, for tools that weld vertices by position.

    Each vertex of a coincident group moves `distance` (at most a quarter of the way) towards the centroid of
    its own one-ring, which parts the split copies of a pinch, plus about half of `distance` along its own normal,
    which parts the two copies of a doubled sheet (same one-ring, opposite normals) into a thin shell.
    """
    if vertices.shape[0] < 2:
        return vertices
    _, group, count = torch.unique(vertices, dim=0, return_inverse=True, return_counts=True)
    shared = count[group] > 1
    if not bool(shared.any()):
        return vertices
    f = faces.long()
    ring = torch.zeros_like(vertices)
    normal = torch.zeros_like(vertices)
    seen = torch.zeros(vertices.shape[0], dtype=vertices.dtype, device=vertices.device)
    n = face_normals(vertices, f)
    for k in range(3):
        ring.index_add_(0, f[:, k], 0.5 * (vertices[f[:, (k + 1) % 3]] + vertices[f[:, (k + 2) % 3]]))
        normal.index_add_(0, f[:, k], n)
        seen.index_add_(0, f[:, k], torch.ones_like(f[:, k], dtype=vertices.dtype))
    towards = ring / seen.clamp_min(1).unsqueeze(1) - vertices
    length = towards.norm(dim=1, keepdim=True)
    step = torch.minimum(torch.full_like(length, 0.25), distance / length.clamp_min(1e-30))
    normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-30)
    # The k-th member of a group (by index) goes (0.5 + 0.3 k) x distance along its normal: copies facing the
    # same way (a sheet doubled between tangent surfaces) part too.
    order = torch.argsort(group, stable=True)
    first = torch.cumsum(count, 0) - count
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - first[group[order]]
    along = (0.5 + 0.3 * rank.to(vertices.dtype)).unsqueeze(1) * distance
    moved = vertices + step * towards + along * normal
    return torch.where((shared & (seen > 0)).unsqueeze(1), moved, vertices)
