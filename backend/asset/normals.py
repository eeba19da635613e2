"""Smooth shading normals that keep sharp edges: one normal per fan of corners between creases.

Around each vertex, the corners of faces joined across an edge whose dihedral angle is below the threshold
form a smoothing fan; borders and sharper edges separate fans. A fan's normal is the corner-angle-weighted mean
of its faces' normals (angle weights do not depend on how the surface happens to be triangulated). A smooth
surface gets one normal per vertex; a crease gets one per side, which is what glTF (split vertices) and
Blender (custom corner normals) need to show it sharp.
"""

from __future__ import annotations

import math

import torch

from backend.asset.manifold import corner_fans
from backend.asset.meshutil import edges_of, face_normals, manifold_side_pairs, unit_face_normals


def corner_angles(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[F, 3] interior angle of each face at each corner."""
    p = vertices[faces.long()]
    e1 = p.roll(-1, dims=1) - p
    e2 = p.roll(1, dims=1) - p
    cos = (e1 * e2).sum(dim=2) / (e1.norm(dim=2) * e2.norm(dim=2)).clamp_min(1e-300)
    return torch.acos(cos.clamp(-1, 1))


def smooth_normals(vertices: torch.Tensor, faces: torch.Tensor, sharp_angle: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fan id [F, 3] per face corner, numbered 0..G-1, unit normal [G, 3] per fan). `sharp_angle` in degrees:
    edges whose faces' normals differ by more are creases."""
    f = faces.long()
    p = vertices.double()
    unit, _ = unit_face_normals(p, f)
    sides = manifold_side_pairs(edges_of(f, p.shape[0]))
    cos = (unit[sides[:, 0] // 3] * unit[sides[:, 1] // 3]).sum(dim=1)
    start = f.reshape(-1)
    smooth = (cos >= math.cos(math.radians(sharp_angle))) & (start[sides[:, 0]] != start[sides[:, 1]])
    label = corner_fans(f, sides[smooth])
    _, fan = torch.unique(label, return_inverse=True)
    weight = corner_angles(p, f).reshape(-1, 1) * unit.repeat_interleave(3, dim=0)
    normal = torch.zeros(int(fan.max()) + 1 if fan.numel() else 0, 3, dtype=p.dtype, device=p.device)
    normal.index_add_(0, fan, weight)
    length = normal.norm(dim=1, keepdim=True)
    up = torch.zeros_like(normal)
    up[:, 2] = 1.0
    normal = torch.where(length > 1e-30, normal / length.clamp_min(1e-300), up)
    return fan.reshape(-1, 3), normal.to(vertices.dtype)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [V, 3] (one per vertex, no splits: for meshes whose vertices must stay as
    they are); an unreferenced vertex gets +Z rather than NaN."""
    n = face_normals(vertices, faces)
    acc = torch.zeros_like(vertices).index_add_(0, faces.long().reshape(-1), n.repeat_interleave(3, dim=0))
    length = acc.norm(dim=1, keepdim=True)
    up = torch.zeros_like(acc)
    up[:, 2] = 1.0
    return torch.where(length > 1e-20, acc / length.clamp_min(1e-30), up)
