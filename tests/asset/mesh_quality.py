"""Quality measures of a built mesh against its source, shared by the asset tests and benchmarks/quality_asset.py.

The output is welded by position first (its vertices are split along UV seams and creases; see
backend/asset/textured_mesh.py), so the topology measured is the one a modelling tool sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from backend.asset.meshutil import boundary_sides, connected_components, edges_of, face_normals
from backend.asset.simplify import triangle_quality
from backend.ovoxel.nearest import closest_points

SLIVER_QUALITY = 0.1  # 4 sqrt(3) area / sum of squared edges below this (e.g. a 3:1 isosceles cap is 0.6)


def weld(positions: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices, faces) with bit-identical positions merged."""
    keys = np.ascontiguousarray(positions, dtype=np.float32).view(np.dtype((np.void, 12))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return torch.from_numpy(positions[first].astype(np.float64)), torch.from_numpy(inverse.reshape(-1)[indices])


@dataclass
class Topology:
    non_manifold_edges: int
    boundary_edges: int
    boundary_loops: int
    inconsistent_edges: int  # manifold edges whose two faces run them the same way
    components: int


def topology(vertices: torch.Tensor, faces: torch.Tensor) -> Topology:
    f = faces.long()
    edges = edges_of(f, vertices.shape[0])
    side, a, b = boundary_sides(f, vertices.shape[0])
    loops = int(torch.unique(connected_components(vertices.shape[0], a, b)[a]).numel()) if side.numel() else 0
    side_edge = edges.of_side.reshape(-1)
    sides = torch.nonzero(edges.count[side_edge] == 2).squeeze(1)
    sides = sides[torch.argsort(side_edge[sides], stable=True)].reshape(-1, 2)
    start = f.reshape(-1)
    inconsistent = int((start[sides[:, 0]] == start[sides[:, 1]]).sum())
    label = connected_components(vertices.shape[0], torch.cat([f[:, 0], f[:, 1]]), torch.cat([f[:, 1], f[:, 2]]))
    return Topology(int((edges.count > 2).sum()), int((edges.count == 1).sum()), loops, inconsistent,
                    int(torch.unique(label[f[:, 0]]).numel()))


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, n: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [n, 3], their face) uniformly by area."""
    g = torch.Generator().manual_seed(seed)
    area = face_normals(vertices, faces.long()).norm(dim=1)
    face = torch.multinomial(area, n, replacement=True, generator=g)
    r1, r2 = torch.rand(n, generator=g, dtype=vertices.dtype).sqrt(), torch.rand(n, generator=g, dtype=vertices.dtype)
    w = torch.stack([1 - r1, r1 * (1 - r2), r1 * r2], 1)
    return (w.unsqueeze(2) * vertices[faces.long()[face]]).sum(dim=1), face


def chamfer(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], n: int = 20000
            ) -> float:
    """Mean of the two one-sided mean surface-to-surface distances (world units)."""
    pa, _ = sample_surface(*a, n, 1)
    pb, _ = sample_surface(*b, n, 2)
    d_ab = closest_points(b[0], b[1].long(), pa, radius=0.01).distance
    d_ba = closest_points(a[0], a[1].long(), pb, radius=0.01).distance
    return 0.5 * float(d_ab.mean() + d_ba.mean())


def flipped_fraction(out: tuple[torch.Tensor, torch.Tensor], source: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Area fraction of output faces whose normal points against the source surface's at the nearest point."""
    v, f = out
    n = face_normals(v, f.long())
    area = n.norm(dim=1)
    centre = v[f.long()].mean(dim=1)
    hit = closest_points(source[0], source[1].long(), centre, radius=0.01)
    n_src = face_normals(source[0], source[1].long())[hit.face]
    return float(area[(n * n_src).sum(dim=1) < 0].sum() / area.sum())


def sliver_fraction(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    quality = triangle_quality(vertices[faces.long()], face_normals(vertices, faces.long()))
    return float((quality < SLIVER_QUALITY).double().mean())


def as_dict(t: Topology) -> dict[str, int]:
    return asdict(t)
