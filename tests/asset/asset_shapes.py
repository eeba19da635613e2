"""Meshes and O-Voxels the asset tests (and the GPU benchmark) build themselves, with known answers.

`voxelize` turns a signed distance function into an O-Voxel the way the decoder shapes one: surface voxels
found coarse to fine, a dual vertex per voxel on the surface, edge flags from sign changes at the voxel's
upper lattice edges, the mesh from `flexible_dual_grid_to_mesh` (so its winding is as inconsistent as the
real decoder's), and attributes from a known function of the voxel centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from backend.ovoxel.dual_grid import flexible_dual_grid_to_mesh
from backend.ovoxel.ovoxel import OVoxel

Field = Callable[[torch.Tensor], torch.Tensor]


def sphere_sdf(centre: tuple[float, float, float], radius: float, bump: float = 0.0, freq: float = 0.0) -> Field:
    c = torch.tensor(centre)

    def sdf(p: torch.Tensor) -> torch.Tensor:
        q = p - c.to(p)
        wobble = 1 + bump * torch.sin(freq * q[:, 0]) * torch.sin(freq * q[:, 1]) * torch.sin(freq * q[:, 2])
        return q.norm(dim=1) - radius * wobble
    return sdf


def torus_sdf(centre: tuple[float, float, float], major: float, minor: float) -> Field:
    c = torch.tensor(centre)

    def sdf(p: torch.Tensor) -> torch.Tensor:
        q = p - c.to(p)
        ring = torch.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2) - major
        return torch.sqrt(ring**2 + q[:, 2] ** 2) - minor
    return sdf


def union(*fields: Field) -> Field:
    return lambda p: torch.stack([f(p) for f in fields]).amin(dim=0)


def pbr_pattern(p: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """[N, 6] smooth attributes in PBR_LAYOUT order; alpha dips below 1 for x > 0.2 unless fixed."""
    x, y, z = p.unbind(1)
    base = 0.5 + 0.4 * torch.stack([torch.sin(6 * x), torch.sin(6 * y + 1), torch.cos(6 * z)], 1)
    metallic = (0.5 + x).clamp(0, 1)
    roughness = 0.3 + 0.4 * (z + 0.5).clamp(0, 1)
    a = torch.full_like(x, alpha) if alpha is not None else torch.where(x > 0.2, 0.4, 1.0)
    return torch.cat([base, metallic[:, None], roughness[:, None], a[:, None]], dim=1)


def dual_grid_inputs(sdf: Field, resolution: int, lipschitz: float = 1.0, device: str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the shape decoder would emit for the zero set of `sdf`: (voxel coords [N, 3], dual vertices [N, 3]
    in voxel units from each voxel's min corner, edge flags [N, 3]). `resolution` is a power of two >= 16."""
    res = 16
    axis = torch.arange(res, device=device)
    cells = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    children = torch.stack(torch.meshgrid(*[torch.arange(2, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
    while True:
        h = 1.0 / res
        centre = (cells.float() + 0.5) * h - 0.5
        cells = cells[sdf(centre).abs() <= lipschitz * 0.8661 * h]
        if res == resolution:
            break
        cells = (cells.unsqueeze(1) * 2 + children).reshape(-1, 3)
        res *= 2
    h = 1.0 / resolution
    p = (cells.float() + 0.5) * h - 0.5
    for _ in range(3):  # Newton steps from the voxel centre onto the surface
        p.requires_grad_(True)
        d = sdf(p)
        (g,) = torch.autograd.grad(d.sum(), p)
        p = (p - (d / (g * g).sum(1).clamp_min(1e-12)).unsqueeze(1) * g).detach()
    dual = ((p + 0.5) / h - cells.float()).clamp(-0.45, 1.45)
    flags = []
    for a in range(3):
        lower = torch.ones(3, device=device)
        lower[a] = 0
        g0 = (cells.float() + lower) * h - 0.5
        g1 = g0.clone()
        g1[:, a] += h
        flags.append((sdf(g0) < 0) != (sdf(g1) < 0))
    return cells, dual, torch.stack(flags, 1)


def voxelize(sdf: Field, resolution: int, attributes: Callable[[torch.Tensor], torch.Tensor] = pbr_pattern,
             lipschitz: float = 1.0, device: str = "cpu") -> OVoxel:
    """O-Voxel of the zero set of `sdf` inside [-0.5, 0.5]^3 at `resolution` (a power of two >= 16)."""
    cells, dual, flags = dual_grid_inputs(sdf, resolution, lipschitz, device)
    vertices, faces = flexible_dual_grid_to_mesh(cells, dual, flags, None, [[-0.5] * 3, [0.5] * 3], resolution)
    centre = (cells.float() + 0.5) / resolution - 0.5
    return OVoxel(cells.int().cpu().numpy(), attributes(centre).float().cpu().numpy(), resolution,
                  vertices.cpu().numpy(), faces.cpu().numpy())


def uv_sphere(rings: int, segments: int, radius: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed sphere, counter-clockwise from outside: poles plus (rings - 1) x segments vertices."""
    theta = torch.arange(1, rings, dtype=torch.float64) * math.pi / rings
    phi = torch.arange(segments, dtype=torch.float64) * 2 * math.pi / segments
    t, f = torch.meshgrid(theta, phi, indexing="ij")
    body = torch.stack([torch.sin(t) * torch.cos(f), torch.sin(t) * torch.sin(f), torch.cos(t)], -1).reshape(-1, 3)
    vertices = torch.cat([torch.tensor([[0.0, 0, 1]], dtype=torch.float64), body,
                          torch.tensor([[0.0, 0, -1]], dtype=torch.float64)]) * radius
    south = vertices.shape[0] - 1
    faces = []
    s = torch.arange(segments)
    s1 = (s + 1) % segments
    faces.append(torch.stack([torch.zeros_like(s), 1 + s, 1 + s1], 1))
    for r in range(rings - 2):
        a, b = 1 + r * segments + s, 1 + r * segments + s1
        c, d = a + segments, b + segments
        faces += [torch.stack([a, c, d], 1), torch.stack([a, d, b], 1)]
    last = 1 + (rings - 2) * segments
    faces.append(torch.stack([last + s, torch.full_like(s, south), last + s1], 1))
    return vertices.float(), torch.cat(faces).int()


def sheet(n: int, size: float = 0.8, wave: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Open wavy square (n x n quads), normals towards +z, one boundary loop of length 4 x size."""
    u = torch.linspace(-size / 2, size / 2, n + 1, dtype=torch.float64)
    x, y = torch.meshgrid(u, u, indexing="ij")
    z = wave * torch.sin(8 * x) * torch.cos(6 * y)
    vertices = torch.stack([x, y, z], -1).reshape(-1, 3).float()
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a = (i * (n + 1) + j).reshape(-1)
    b, c, d = a + n + 1, a + n + 2, a + 1
    return vertices, torch.cat([torch.stack([a, b, c], 1), torch.stack([a, c, d], 1)]).int()
