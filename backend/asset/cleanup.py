"""Mesh repairs the later steps rely on: no degenerate or duplicate faces, no dust, no unused vertices.

(Winding is orientation.py's job, non-manifold spots manifold.py's.)
"""

from __future__ import annotations

import torch

from backend.asset.meshutil import compact, connected_components, face_normals


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


def remove_opposite_pairs(faces: torch.Tensor) -> torch.Tensor:
    """Drops every face over the same three vertices as a face wound the other way. On a 2-manifold such a pair
    is a closed flat pillow on its own (a one-face sheet doubled by the manifold repair): it encloses nothing,
    and keeping one of the two would leave a triangular hole."""
    f = faces.long()
    if f.shape[0] == 0:
        return faces
    lowest = f.argmin(dim=1, keepdim=True)
    after = f.gather(1, (lowest + 1) % 3).squeeze(1)
    before = f.gather(1, (lowest + 2) % 3).squeeze(1)
    winding = (after < before).long()  # the cyclic order read from the lowest corner
    _, group = torch.unique(f.sort(dim=1).values, dim=0, return_inverse=True)
    kinds = torch.zeros(int(group.max()) + 1, 2, dtype=torch.long, device=f.device)
    kinds.index_put_((group, winding), torch.ones_like(group), accumulate=True)
    both = (kinds > 0).all(dim=1)
    return faces[~both[group]]


def face_components(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """Component label per face, numbered 0..C-1; faces sharing a vertex are connected."""
    f = faces.long()
    vertex_label = connected_components(num_vertices, torch.cat([f[:, 0], f[:, 1]]), torch.cat([f[:, 1], f[:, 2]]))
    return torch.unique(vertex_label[f[:, 0]], return_inverse=True)[1]


def remove_small_components(vertices: torch.Tensor, faces: torch.Tensor, min_area: float) -> torch.Tensor:
    """Faces of the components whose total area is at least `min_area` (floating specks go)."""
    label = face_components(faces, vertices.shape[0])
    area = 0.5 * face_normals(vertices, faces).norm(dim=1)
    total = torch.zeros(vertices.shape[0], dtype=area.dtype, device=area.device).index_add_(0, label, area)
    return faces[total[label] >= min_area]


def clean(vertices: torch.Tensor, faces: torch.Tensor, min_component_area: float = 1e-5
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pillows, degenerate/duplicate faces, small components and unreferenced vertices removed (winding
    kept)."""
    faces = remove_degenerate_and_duplicate_faces(remove_opposite_pairs(faces))
    faces = remove_small_components(vertices, faces, min_component_area)
    return compact(vertices, faces)

