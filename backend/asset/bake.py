"""Baking the O-Voxel's PBR attributes into the UV atlas (spec §7.4 steps 4-5).

Each texel centre covered by a triangle is lifted to 3D on the simplified mesh, moved to the closest point of
the reference (pre-simplification) surface, and takes the attributes there: the barycentric blend of that
reference face's vertex attributes. Those are the attributes of each vertex's own voxel (postprocess.py), so a
texel only ever reads the surface it lies on. (The reference samples the voxel grid trilinearly around the
point instead, which mixes in any other surface within a voxel: a part behind a thin wall, the other side of
a thin part, a neighbouring part.) Uncovered texels are filled (inpaint.py), then every channel becomes 8-bit
(x 255, rounded, clipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.asset.inpaint import fill_uncovered
from backend.ovoxel.nearest import closest_points
from backend.ovoxel.ovoxel import PBR_LAYOUT
from backend.asset.raster import rasterize
from backend.asset.uv import UVLayout


@dataclass
class BakedTextures:
    base_color: torch.Tensor  # uint8 [T, T, 4] RGBA, top row first
    metallic_roughness: torch.Tensor  # uint8 [T, T, 3] (0, roughness, metallic)


def texel_attributes(layout: UVLayout, vertices: torch.Tensor, reference_vertices: torch.Tensor,
                     reference_faces: torch.Tensor, reference_attrs: torch.Tensor, voxel_size: float,
                     texture_size: int, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(attributes [T, T, C] float, covered [T, T] bool), uncovered texels left at 0.

    `offset` is how far (in voxels) the mesh is expected to sit off the reference surface (the remesh band):
    it sizes the first closest-point search radius, which decides its cost, not its result.
    """
    raster = rasterize(layout.pixels, layout.faces, texture_size, texture_size)
    covered = raster.face >= 0
    ys, xs = torch.nonzero(covered, as_tuple=True)
    corners = layout.vertex[layout.faces[raster.face[ys, xs]]]  # [M, 3] source vertex ids
    w = raster.bary[ys, xs].to(vertices.dtype)
    points = (w.unsqueeze(2) * vertices[corners]).sum(dim=1)
    hit = closest_points(reference_vertices, reference_faces, points, radius=(offset + 0.75) * voxel_size)
    corners = reference_faces.long()[hit.face]
    values = (hit.bary.to(reference_attrs.dtype).unsqueeze(2) * reference_attrs[corners]).sum(dim=1)
    image = reference_attrs.new_zeros(texture_size, texture_size, reference_attrs.shape[1])
    image[ys, xs] = values
    return image, covered


def to_textures(image: torch.Tensor, covered: torch.Tensor) -> BakedTextures:
    """Fill uncovered texels, quantise, and split the PBR channels into the two glTF textures."""
    filled = fill_uncovered(image, covered)
    q = (filled.clamp(0, 1) * 255).round().to(torch.uint8)

    def channels(name: str) -> torch.Tensor:
        start, end = PBR_LAYOUT[name]
        return q[..., start:end]

    base_color = torch.cat([channels("base_color"), channels("alpha")], dim=-1)
    metallic_roughness = torch.cat([torch.zeros_like(channels("metallic")), channels("roughness"),
                                    channels("metallic")], dim=-1)
    return BakedTextures(base_color, metallic_roughness)
