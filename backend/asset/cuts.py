"""Closing the cuts the manifold repair leaves, whatever their size, with a minimum-area triangulation.

Where the pairing at a junction leaves faces that all run an edge the same way, `manifold.make_manifold` cuts
them loose, and the cut shows as a boundary loop along a seam between parts: often longer than any small hole
but only a few voxels wide. Such a loop is not an opening of the object: every one of its sides lay on an
interior edge of the decoded surface (one with two or more faces). Those loops are triangulated over their own
vertices (no new vertex, so attributes need nothing new) by the classic O(n³) dynamic programme over the
polygon: the triangulation of least area plus `SHAPE_WEIGHT` x the sum of squared edge lengths, which
zig-zags across a narrow strip instead of fanning along it. A diagonal that is already an edge of the mesh is
never used (it would put three faces on it). Loops that touched a border of the decoded surface are real
openings and are left to `holes.fill_small_holes`.
"""

from __future__ import annotations

import torch

from backend.asset.meshutil import boundary_sides, connected_components, edges_of

SHAPE_WEIGHT = 0.1  # squared edge length against area in the triangulation cost
MAX_CUT_EDGES = 1200  # longer loops are left open: the programme costs n³/6 steps (1200 edges: ~4 s on 2 CPU cores)


def close_cuts(vertices: torch.Tensor, faces: torch.Tensor, origin: torch.Tensor, source_faces: torch.Tensor
               ) -> torch.Tensor:
    """faces with every simple boundary loop triangulated whose sides all lay on interior edges of the source
    surface; origin [V] maps each vertex to the source vertex it copies (negative: no source vertex)."""
    f = faces.long()
    nv = vertices.shape[0]
    side, a, b = boundary_sides(f, nv)
    if side.numel() == 0:
        return faces
    loop = connected_components(nv, a, b)[a]
    degree = torch.bincount(torch.cat([a, b]), minlength=nv)
    bad = (degree[a] != 2) | (degree[b] != 2) | _on_source_border(origin[a], origin[b], source_faces)
    # A loop is closed only when none of its sides is bad (counted as integers: no boolean scatter on CUDA).
    rejected = torch.zeros(nv, dtype=torch.long, device=f.device).index_add_(0, loop, bad.long())
    size = torch.bincount(loop, minlength=nv)
    take = (rejected[loop] == 0) & (size[loop] <= MAX_CUT_EDGES) & (size[loop] >= 3)
    if not bool(take.any()):
        return faces
    a, b, loop = a[take], b[take], loop[take]
    order = _walk(a, b, loop, nv)
    a, loop = a[order], loop[order]
    mesh_edges = edges_of(f, nv).pairs
    new_faces = []
    for start, count in _runs(loop):
        ring = a[start: start + count]
        new_faces.append(_triangulate(vertices, ring, mesh_edges))
    return torch.cat([faces, torch.cat(new_faces).to(faces.dtype)])


def _on_source_border(start: torch.Tensor, end: torch.Tensor, source_faces: torch.Tensor) -> torch.Tensor:
    """Whether each side (start -> end, source vertex ids) lies on an edge of at most one source face."""
    nv = int(source_faces.max()) + 1
    edges = edges_of(source_faces.long(), nv)
    keys = edges.pairs[:, 0] * nv + edges.pairs[:, 1]
    valid = (start >= 0) & (end >= 0)
    query = torch.minimum(start, end).clamp_min(0) * nv + torch.maximum(start, end).clamp_min(0)
    at = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
    interior = valid & (keys[at] == query) & (edges.count[at] >= 2)
    return ~interior


def _walk(a: torch.Tensor, b: torch.Tensor, loop: torch.Tensor, nv: int) -> torch.Tensor:
    """Order of the sides (a -> b, each vertex starting exactly one) that walks every loop from its smallest
    side, as a permutation sorted by loop: list ranking by pointer jumping, no loop over vertices."""
    n = a.numel()
    side_from = torch.full((nv,), -1, dtype=torch.long, device=a.device)
    side_from[a] = torch.arange(n, device=a.device)
    succ = side_from[b]
    first = torch.full((nv,), n, dtype=torch.long, device=a.device).scatter_reduce_(
        0, loop, torch.arange(n, device=a.device), "amin")[loop]
    # Cut each cycle before its first side: the side leading to it becomes the end of a list.
    last = succ == first
    succ = torch.where(last, torch.arange(n, device=a.device), succ)
    to_end = (~last).long()
    while True:  # Wyllie's list ranking: each side's distance to its list's end
        nxt = succ[succ]
        if torch.equal(nxt, succ):
            break
        to_end = to_end + to_end[succ]
        succ = nxt
    return torch.argsort(loop * (n + 1) - to_end, stable=True)


def _runs(sorted_labels: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of equal labels in a sorted label tensor."""
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return list(zip(starts.tolist(), counts.tolist()))


def _triangulate(vertices: torch.Tensor, ring: torch.Tensor, mesh_edges: torch.Tensor) -> torch.Tensor:
    """Faces [n - 2, 3] closing the polygon `ring` (vertex ids in the order the existing faces run its sides),
    wound against those sides."""
    n = ring.numel()
    device = ring.device
    p = vertices[ring].double().cpu()
    position = torch.full((vertices.shape[0],), -1, dtype=torch.long, device=device)
    position[ring] = torch.arange(n, device=device)
    pi, pj = position[mesh_edges[:, 0]], position[mesh_edges[:, 1]]
    both = (pi >= 0) & (pj >= 0)
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[pi[both].cpu(), pj[both].cpu()] = True
    blocked |= blocked.clone().T
    idx = torch.arange(n)
    blocked[idx, idx] = False
    blocked[idx[:-1], idx[1:]] = False  # the ring's own sides
    blocked[0, n - 1] = False
    d2 = torch.cdist(p, p) ** 2  # squared distances: areas and shapes come from gathers, not cross products
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    cost = torch.zeros(n, n, dtype=torch.float64)
    best = torch.zeros(n, n, dtype=torch.long)
    for length in range(2, n):
        i = torch.arange(n - length).unsqueeze(1)
        j = i + length
        k = i + torch.arange(1, length).unsqueeze(0)
        ik, kj, ij = d2[i, k], d2[k, j], d2[i, j]
        # |u x v|^2 = |u|^2 |v|^2 - (u.v)^2 with u = p_k - p_i, v = p_j - p_i
        area = 0.5 * (ik * ij - 0.25 * (ik + ij - kj) ** 2).clamp_min(0).sqrt()
        total = cost[i, k] + cost[k, j] + area + SHAPE_WEIGHT * (ik + kj + ij)
        value, arg = total.min(dim=1)
        rows, cols = i.squeeze(1), j.squeeze(1)
        cost[rows, cols] = torch.where(blocked[rows, cols], inf, value)
        best[rows, cols] = k.gather(1, arg.unsqueeze(1)).squeeze(1)
    if not bool(torch.isfinite(cost[0, n - 1])):
        return torch.zeros(0, 3, dtype=torch.long, device=device)
    triangles = []
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        k = int(best[i, j])
        triangles.append((j, k, i))
        stack += [(i, k), (k, j)]
    return ring[torch.tensor(triangles, device=device)]
