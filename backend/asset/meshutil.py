"""Mesh primitives shared by the post-processing steps, written as whole-tensor torch ops.

Everything here runs unchanged on CPU and GPU: no Python loop over vertices or faces, only loops whose trip count
grows with log(size) (label propagation with pointer jumping). That is what lets one implementation be both the
CPU path CI runs and the GPU path the benchmark times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Edges:
    """Undirected edges of a triangle mesh and how the faces use them.

    `pairs` [E, 2] holds (low, high) vertex ids; `count` [E] how many face sides lie on each edge (1 = boundary,
    2 = manifold interior, > 2 = non-manifold); `of_side` [F, 3] the edge of face side k, the side from corner k
    to corner k + 1.
    """

    pairs: torch.Tensor
    count: torch.Tensor
    of_side: torch.Tensor


def face_sides(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed sides (start [F, 3], end [F, 3]); side k goes from corner k to corner k + 1."""
    return faces, faces.roll(-1, dims=1)


def edges_of(faces: torch.Tensor, num_vertices: int) -> Edges:
    start, end = face_sides(faces.long())
    lo, hi = torch.minimum(start, end), torch.maximum(start, end)
    keys, inverse, count = torch.unique((lo * num_vertices + hi).reshape(-1), return_inverse=True, return_counts=True)
    pairs = torch.stack([keys // num_vertices, keys % num_vertices], dim=1)
    return Edges(pairs, count, inverse.reshape(-1, 3))


def boundary_sides(faces: torch.Tensor, num_vertices: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(side, start, end) of every face side on a boundary edge: its flat index 3f + k and its two vertex ids."""
    f = faces.long()
    edges = edges_of(f, num_vertices)
    side = torch.nonzero(edges.count[edges.of_side.reshape(-1)] == 1).squeeze(1)
    start, end = face_sides(f)
    return side, start.reshape(-1)[side], end.reshape(-1)[side]


def manifold_side_pairs(edges: Edges) -> torch.Tensor:
    """[M, 2] flat side indices 3f + k of the two face sides on each manifold edge, in edge order."""
    side_edge = edges.of_side.reshape(-1)
    sides = torch.nonzero(edges.count[side_edge] == 2).squeeze(1)
    return sides[torch.argsort(side_edge[sides], stable=True)].reshape(-1, 2)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised normals [F, 3]: length = 2 x area, direction by counter-clockwise winding."""
    p = vertices[faces.long()]
    return torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])


def unit_face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit normals [F, 3], areas [F]); a degenerate face gets a zero normal instead of NaN."""
    n = face_normals(vertices, faces)
    area = 0.5 * n.norm(dim=1)
    return n / (2 * area).clamp_min(1e-300).unsqueeze(1), area


def compact_indices(faces: torch.Tensor, num_vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept vertex ids in order, faces renumbered over them): unreferenced vertices dropped."""
    used = torch.zeros(num_vertices, dtype=torch.bool, device=faces.device)
    used[faces.long().reshape(-1)] = True
    new_id = torch.cumsum(used, 0) - 1
    return torch.nonzero(used).squeeze(1), new_id[faces.long()].to(faces.dtype)


def compact(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops unreferenced vertices; keeps the order of those that stay."""
    kept, faces = compact_indices(faces, vertices.shape[0])
    return vertices[kept], faces


def jump_to_roots(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every entry points at its root (a node that is its own parent)."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand


def connected_components(num_nodes: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Label [num_nodes] = smallest node id of each node's component in the graph with edges (u, v).

    Roots hook under the smallest neighbouring root, then pointer jumping flattens the trees; a parent id only
    ever decreases, so no cycle can form, and the rounds needed grow with log(size) on meshes.
    """
    label = torch.arange(num_nodes, device=u.device)
    u, v = u.long(), v.long()
    while True:
        lu, lv = label[u], label[v]
        low = torch.minimum(lu, lv)
        hooked = label.clone()
        hooked.scatter_reduce_(0, lu, low, "amin")
        hooked.scatter_reduce_(0, lv, low, "amin")
        hooked = jump_to_roots(hooked)
        if torch.equal(hooked, label):
            return label
        label = hooked

