"""Small-hole filling (spec §7.2): each boundary loop shorter than a perimeter limit gets a centroid fan.

Loops are the connected components of the boundary-edge graph; only simple loops (every vertex on exactly two
of the loop's boundary edges) are filled, so a pinched or branching boundary is left alone rather than guessed.
Slits are filled whatever their length: loops whose vector area over half their perimeter (their mean width)
is below `max_width`, such as the two sides of a cut the manifold repair left, which a fan closes flat.
"""

from __future__ import annotations

import torch

from backend.asset.meshutil import boundary_sides, connected_components


def fill_small_holes(vertices: torch.Tensor, faces: torch.Tensor, max_perimeter: float, max_width: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices, faces) with one new vertex and one fan triangle per boundary edge for each small hole.

    The new vertex sits at the mean of the loop's edge midpoints, as the reference places it. Fan triangles
    run against the boundary side they close (side a->b of a face gives triangle b, a, centre), so they take
    the winding of the faces around the hole.
    """
    nv = vertices.shape[0]
    f = faces.long()
    boundary_side, a, b = boundary_sides(f, nv)
    if boundary_side.numel() == 0:
        return vertices, faces

    label = connected_components(nv, a, b)[a]  # loop id per boundary side
    length = (vertices[a] - vertices[b]).norm(dim=1)
    degree = torch.zeros(nv, dtype=torch.long, device=f.device)
    degree.index_add_(0, a, torch.ones_like(a)).index_add_(0, b, torch.ones_like(b))
    perimeter = torch.zeros(nv, dtype=vertices.dtype, device=f.device).index_add_(0, label, length)
    # A loop is simple when every vertex on it has exactly two boundary sides (counted as integers: CUDA has
    # no boolean scatter-reduce).
    branching = ((degree[a] != 2) | (degree[b] != 2)).long()
    simple = torch.zeros(nv, dtype=torch.long, device=f.device).index_add_(0, label, branching) == 0
    centre = torch.zeros(nv, 3, dtype=vertices.dtype, device=f.device).index_add_(0, label, vertices[a])
    centre = centre / torch.bincount(label, minlength=nv).clamp_min(1).unsqueeze(1).to(vertices.dtype)
    c = centre[label]
    swept = torch.zeros(nv, 3, dtype=vertices.dtype, device=f.device).index_add_(
        0, label, torch.linalg.cross(vertices[a] - c, vertices[b] - c))
    width = 0.5 * swept.norm(dim=1) / (0.5 * perimeter).clamp_min(1e-300)
    small = (perimeter < max_perimeter) | (width < max_width)
    fill = small[label] & simple[label]
    if not bool(fill.any()):
        return vertices, faces

    a, b, label, length = a[fill], b[fill], label[fill], length[fill]
    loops, slot = torch.unique(label, return_inverse=True)
    count = torch.zeros(loops.numel(), dtype=vertices.dtype, device=f.device).index_add_(
        0, slot, torch.ones_like(length))
    midpoint_sum = torch.zeros(loops.numel(), 3, dtype=vertices.dtype, device=f.device).index_add_(
        0, slot, 0.5 * (vertices[a] + vertices[b]))
    centres = midpoint_sum / count.unsqueeze(1)
    centre_id = nv + slot
    fan = torch.stack([b, a, centre_id], dim=1).to(faces.dtype)
    return torch.cat([vertices, centres]), torch.cat([faces, fan])
