"""Trilinear sampling of the O-Voxel's sparse attribute grid, by the reference's rule (spec §7.3).

Voxel centres sit at integer + 0.5 in voxel units. Of the 8 voxels around a query, only those that exist
contribute, and their weights are renormalised, so sampling right at the surface (where half the
neighbourhood is empty) still returns the surface colour instead of fading towards zero.
"""

from __future__ import annotations

import torch

from backend.native import VoxelIndex

CORNERS = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


def sample_trilinear(index: VoxelIndex, attrs: torch.Tensor, grid_points: torch.Tensor) -> torch.Tensor:
    """attrs [N, C] sampled at grid_points [M, 3] (voxel units: (p - origin) / voxel_size) -> [M, C].

    A point with no existing voxel among its 8 neighbours gets 0, as in the reference.
    """
    q = grid_points.float()
    base = torch.floor(q - 0.5).long()
    out = attrs.new_zeros(q.shape[0], attrs.shape[1])
    total = q.new_zeros(q.shape[0])
    for corner in CORNERS.to(q.device):
        cell = base + corner
        row = index.lookup(cell)
        w = (1 - (q - (cell.float() + 0.5)).abs()).prod(dim=1)
        w = torch.where(row >= 0, w, torch.zeros_like(w))
        out += w.unsqueeze(1) * attrs[row.clamp_min(0)]
        total += w
    return out / total.clamp_min(1e-12).unsqueeze(1)
