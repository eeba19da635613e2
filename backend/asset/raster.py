"""Rasterising a UV layout: which triangle covers each texel centre, and where inside it.

Every triangle lists the texel centres inside its bounding box, keeps those its three edge functions accept,
and writes its id there. UV charts are small, so the boxes hold only a few texels each and the whole atlas is
a handful of whole-tensor ops, on CPU or GPU alike. Where triangles overlap, the higher face id wins, so the
result does not depend on scheduling; `count` says how many triangles claimed each texel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.ovoxel.segments import expand_segments


@dataclass
class Raster:
    face: torch.Tensor  # long [H, W], -1 where no triangle covers the texel centre
    bary: torch.Tensor  # float32 [H, W, 3] barycentric weights of the texel centre in that face
    count: torch.Tensor  # int32 [H, W] triangles covering the texel centre


def rasterize(pixels: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> Raster:
    """pixels [V, 2] = (x, y) in texel units (texel (r, c) has its centre at x = c + 0.5, y = r + 0.5).

    A centre on a shared edge goes to both triangles (count 2 there); either choice is correct for baking.
    """
    device = pixels.device
    max_pairs = 1 << 25 if pixels.is_cuda else 1 << 22  # texel candidates per chunk
    f = faces.long()
    p = pixels.double()[f]  # [F, 3, 2]
    lo = torch.ceil(p.amin(dim=1) - 0.5).long().clamp_min(0)
    hi = torch.floor(p.amax(dim=1) - 0.5).long()
    hi = torch.minimum(hi, torch.tensor([width - 1, height - 1], device=device))
    span = (hi - lo + 1).clamp_min(0)
    count = span[:, 0] * span[:, 1]
    ends = torch.cumsum(count, 0)
    best = torch.full((height * width,), -1, dtype=torch.long, device=device)
    hits = torch.zeros(height * width, dtype=torch.int32, device=device)
    first = 0
    nf = f.shape[0]
    while first < nf:
        base = int(ends[first - 1]) if first else 0
        last = min(nf, max(first + 1, int(torch.searchsorted(ends, base + max_pairs, right=True))))
        n = count[first:last]
        face, local = expand_segments(n)
        face = face + first
        w = span[face, 0]
        x = lo[face, 0] + local % w
        y = lo[face, 1] + local // w
        inside = _edge_weights(p[face], x.double() + 0.5, y.double() + 0.5).amin(dim=1) >= 0
        texel = (y * width + x)[inside]
        best.scatter_reduce_(0, texel, face[inside], "amax")
        hits.index_add_(0, texel, torch.ones_like(texel, dtype=torch.int32))
        first = last
    face = best.reshape(height, width)
    covered = face >= 0
    ys, xs = torch.nonzero(covered, as_tuple=True)
    bary = torch.zeros(height, width, 3, dtype=torch.float32, device=device)
    if ys.numel():
        weights = _edge_weights(p[face[ys, xs]], xs.double() + 0.5, ys.double() + 0.5)
        bary[ys, xs] = (weights / weights.sum(dim=1, keepdim=True)).float()
    return Raster(face, bary, hits.reshape(height, width))


def _edge_weights(tri: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unnormalised barycentric weights [M, 3] (sub-triangle areas), all >= 0 inside either winding."""
    ax, ay = tri[:, 0, 0], tri[:, 0, 1]
    bx, by = tri[:, 1, 0], tri[:, 1, 1]
    cx, cy = tri[:, 2, 0], tri[:, 2, 1]
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    sign = torch.where(area < 0, -1.0, 1.0).to(tri.dtype)
    wa = (bx - x) * (cy - y) - (by - y) * (cx - x)
    wb = (cx - x) * (ay - y) - (cy - y) * (ax - x)
    wc = (ax - x) * (by - y) - (ay - y) * (bx - x)
    weights = torch.stack([wa, wb, wc], dim=1) * sign.unsqueeze(1)
    return torch.where((area == 0).unsqueeze(1), torch.full_like(weights, -1.0), weights)
