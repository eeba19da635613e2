"""Mesh repairs the later steps rely on: no degenerate or duplicate faces, no dust, one consistent winding.

The decoded dual-grid mesh is not consistently oriented (spec §7.1 step 5: each quad keeps a fixed per-axis
corner order), and the simplifier's flip test, the vertex normals and the chart clustering all need it to be.
"""

from __future__ import annotations

import torch

from backend.asset.meshutil import compact, connected_components, edges_of, face_normals, manifold_side_pairs
from backend.ovoxel.segments import INT64_MAX


def remove_degenerate_and_duplicate_faces(faces: torch.Tensor) -> torch.Tensor:
    """Drops faces with a repeated corner and all but the first of faces over the same three vertices."""
    f = faces.long()
    ok = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])
    f = f[ok]
    if f.shape[0] == 0:
        return faces[:0]
    _, inverse = torch.unique(f.sort(dim=1).values, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), f.shape[0], dtype=torch.long, device=f.device)
    first.scatter_reduce_(0, inverse, torch.arange(f.shape[0], device=f.device), "amin")
    keep = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
    keep[first] = True
    return f[keep].to(faces.dtype)


def face_components(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """Component label per face; faces sharing a vertex are connected."""
    f = faces.long()
    vertex_label = connected_components(num_vertices, torch.cat([f[:, 0], f[:, 1]]), torch.cat([f[:, 1], f[:, 2]]))
    return vertex_label[f[:, 0]]


def remove_small_components(vertices: torch.Tensor, faces: torch.Tensor, min_area: float) -> torch.Tensor:
    """Faces of the components whose total area is at least `min_area` (floating specks go)."""
    label = face_components(faces, vertices.shape[0])
    area = 0.5 * face_normals(vertices, faces).norm(dim=1)
    total = torch.zeros(vertices.shape[0], dtype=area.dtype, device=area.device).index_add_(0, label, area)
    return faces[total[label] >= min_area]


def unify_orientation(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Faces re-wound so neighbours across every manifold edge agree, each component facing outwards.

    Parallel union-find with parity: a face's flip bit relative to its root is kept along the parent links.
    Two faces whose shared edge runs the same way in both must have opposite flip bits. Roots hook under the
    smallest neighbouring root with the parity that satisfies one such constraint; pointer jumping composes
    parities. Constraints that contradict the tree (non-orientable loops) are ignored. Each component then
    takes the sign that makes its signed volume (about its own centroid) positive, i.e. normals point out.
    """
    f = faces.long()
    nf = f.shape[0]
    if nf == 0:
        return faces
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

    flip = parity.bool()
    oriented = torch.where(flip.unsqueeze(1), f[:, [0, 2, 1]], f)
    # Signed volume per component, about the component's vertex-weighted centroid.
    p = vertices.double()[oriented]
    count = torch.zeros(nf, dtype=torch.float64, device=f.device).index_add_(0, parent, torch.ones_like(p[:, 0, 0]))
    centroid = torch.zeros(nf, 3, dtype=torch.float64, device=f.device).index_add_(0, parent, p.mean(dim=1))
    centroid = centroid / count.clamp_min(1).unsqueeze(1)
    q = p - centroid[parent].unsqueeze(1)
    volume = (q[:, 0] * torch.linalg.cross(q[:, 1], q[:, 2])).sum(dim=1)
    total = torch.zeros(nf, dtype=torch.float64, device=f.device).index_add_(0, parent, volume)
    outward = total[parent] >= 0
    return torch.where(outward.unsqueeze(1), oriented, oriented[:, [0, 2, 1]]).to(faces.dtype)


def clean(vertices: torch.Tensor, faces: torch.Tensor, min_component_area: float = 1e-5
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The full repair: degenerate/duplicate faces, small components, unreferenced vertices, orientation."""
    faces = remove_degenerate_and_duplicate_faces(faces)
    faces = remove_small_components(vertices, faces, min_component_area)
    vertices, faces = compact(vertices, faces)
    return vertices, unify_orientation(vertices, faces)

