"""Golden kinds of the texturing pipeline (`shared/reference/golden-texturing/`): the voxeliser, the
spatial-to-channel op, the shape encoder and the pipeline glue.

The voxeliser's rows are compared in our own order after sorting both sides by (x, y, z) (what must match), and
once more in the stored order (which ours reproduces too, and which fixes the encoder's input order).
"""

from __future__ import annotations

import re

import torch

from backend.golden.registry import Case, Check, close, exact, golden_kind
from backend.ovoxel.voxelizer import mesh_to_flexible_dual_grid


def _xyz_order(coords: torch.Tensor) -> torch.Tensor:
    """Row order sorting integer coordinates [N, D] lexicographically."""
    key = torch.zeros(coords.shape[0], dtype=torch.long)
    for d in range(coords.shape[1]):
        key = key * (int(coords[:, d].max()) + 1 if coords.numel() else 1) + coords[:, d].long()
    return torch.argsort(key)


def voxel_checks(prefix: str, coords: torch.Tensor, dual_vertices: torch.Tensor, intersected: torch.Tensor,
                 t: dict[str, torch.Tensor], names: tuple[str, str, str]) -> list[Check]:
    """Voxeliser outputs against the stored ones: the sets (sorted by xyz) and the stored row order."""
    ref_coords, ref_dual, ref_flags = (t[n] for n in names)
    if coords.shape != ref_coords.shape:
        return [Check(f"{prefix}voxel_count", float("inf"), False, f"{coords.shape[0]} voxels, reference "
                                                                   f"{ref_coords.shape[0]}")]
    ours, theirs = _xyz_order(coords), _xyz_order(ref_coords)
    return [
        exact(f"{prefix}voxel_set", coords[ours], ref_coords[theirs]),
        close(f"{prefix}dual_vertices", dual_vertices[ours], ref_dual[theirs]),
        exact(f"{prefix}intersected", intersected[ours], ref_flags[theirs].bool()),
        exact(f"{prefix}row_order", coords, ref_coords),
    ]


@golden_kind("mesh_to_flexible_dual_grid")
def mesh_to_dual_grid(case: Case) -> list[Check]:
    t = case.tensors
    checks = []
    for name in sorted(t):
        if not (m := re.fullmatch(r"out\.(\w+)_g(\d+)_voxel_indices", name)):
            continue
        mesh, grid_size = m.group(1), int(m.group(2))
        grid = mesh_to_flexible_dual_grid(t[f"in.{mesh}_vertices"], t[f"in.{mesh}_faces"], grid_size,
                                          face_weight=1.0, boundary_weight=0.2, regularization_weight=1e-2)
        stem = f"out.{mesh}_g{grid_size}_"
        checks += voxel_checks(stem, grid.coords, grid.dual_vertices, grid.intersected, t,
                               (f"{stem}voxel_indices", f"{stem}dual_vertices", f"{stem}intersected"))
    return checks
