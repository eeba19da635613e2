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


# ---------------------------------------------------------------------------------------------------------------
# Source meshes for the encode -> decode quality checks (float64 vertices, int64 faces, counter-clockwise outside)


def box(size: tuple[float, float, float], centre: tuple[float, float, float] = (0.0, 0.0, 0.0), n: int = 1
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed box, each side an n x n grid of quads."""
    vertices, faces = [], []
    u = torch.linspace(-0.5, 0.5, n + 1, dtype=torch.float64)
    gu, gv = torch.meshgrid(u, u, indexing="ij")
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a = (i * (n + 1) + j).reshape(-1)
    quads = torch.stack([a, a + n + 1, a + n + 2, a + 1], 1)
    offset = 0
    for axis in range(3):
        for sign in (-1.0, 1.0):
            p = torch.zeros((n + 1) ** 2, 3, dtype=torch.float64)
            ax_u, ax_v = (axis + 1) % 3, (axis + 2) % 3
            p[:, axis], p[:, ax_u], p[:, ax_v] = 0.5 * sign, gu.reshape(-1), gv.reshape(-1)
            q = quads if sign > 0 else quads.flip(1)
            vertices.append(p)
            faces.append(torch.cat([q[:, [0, 1, 2]], q[:, [0, 2, 3]]]) + offset)
            offset += p.shape[0]
    v = torch.cat(vertices) * torch.tensor(size, dtype=torch.float64) + torch.tensor(centre, dtype=torch.float64)
    return v, torch.cat(faces)


def prism(outline: torch.Tensor, height: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0), axis: int = 2
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed prism over a star-shaped (about its origin) counter-clockwise outline [M, 2], along `axis`."""
    m = outline.shape[0]
    o = outline.double()
    ring = lambda z: torch.cat([o, torch.full((m, 1), z, dtype=torch.float64)], 1)  # noqa: E731
    v = torch.cat([ring(-height / 2), ring(height / 2), torch.tensor([[0, 0, -height / 2], [0, 0, height / 2]],
                                                                     dtype=torch.float64)])
    i = torch.arange(m)
    j = (i + 1) % m
    bottom, top = torch.full_like(i, 2 * m), torch.full_like(i, 2 * m + 1)
    f = torch.cat([torch.stack([i, j, m + j], 1), torch.stack([i, m + j, m + i], 1),
                   torch.stack([bottom, j, i], 1), torch.stack([top, m + i, m + j], 1)])
    order = [(axis + 1) % 3, (axis + 2) % 3, axis]
    out = torch.empty_like(v)
    out[:, order] = v
    return out + torch.tensor(centre, dtype=torch.float64), f


def cylinder(radius: float, height: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0), axis: int = 2,
             sections: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(sections, dtype=torch.float64) * 2 * math.pi / sections
    return prism(radius * torch.stack([torch.cos(t), torch.sin(t)], 1), height, centre, axis)


def gear(radius: float, depth: float, thickness: float, teeth: int, centre: tuple[float, float, float] = (0, 0, 0)
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spur-gear-like prism: `teeth` square teeth `depth` deep around a disc of `radius`."""
    k = torch.arange(4 * teeth)
    t = (k.double() + 0.5) * 2 * math.pi / (4 * teeth)
    r = torch.where((k // 2) % 2 == 0, radius, radius - depth).double()
    return prism(torch.stack([r * torch.cos(t), r * torch.sin(t)], 1), thickness, centre)


def concatenate(*meshes: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    vertices, faces, offset = [], [], 0
    for v, f in meshes:
        vertices.append(v)
        faces.append(f + offset)
        offset += v.shape[0]
    return torch.cat(vertices), torch.cat(faces)


def bumpy_ball(radius: float = 0.4, level: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed smooth blob: a subdivided icosahedron with low-frequency bumps."""
    v, f = uv_sphere(16 * level, 32 * level, 1.0)
    v = v.double()
    bump = 1 + 0.12 * torch.sin(3 * v[:, 0]) * torch.cos(2 * v[:, 1] + 1) + 0.08 * torch.sin(4 * v[:, 2])
    return v * (radius * bump).unsqueeze(1), f.long()


def engine() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[float, float, float, float]]]:
    """Many touching and crossing parts (the raw dual-grid surface has non-manifold edges where they meet), each
    with its own linear RGBA colour: a block, crossing shafts, gears on the shafts, touching plates, bolts."""
    parts = [
        box((0.5, 0.3, 0.25), (0.0, 0.0, -0.1)),
        cylinder(0.06, 0.8, (0.0, 0.0, 0.05), axis=0),
        cylinder(0.05, 0.6, (0.0, 0.0, 0.05), axis=1),
        gear(0.16, 0.035, 0.05, 16, (0.3, 0.0, 0.05)),
        gear(0.12, 0.03, 0.05, 12, (-0.3, 0.0, 0.05)),
        box((0.2, 0.2, 0.03), (0.12, 0.08, 0.04)),  # lies on the block's top
        box((0.15, 0.25, 0.04), (-0.1, -0.05, 0.045)),
    ]
    parts += [cylinder(0.02, 0.1, (x, y, 0.05), sections=16) for x in (-0.2, 0.2) for y in (-0.11, 0.11)]
    colours = [(0.8, 0.05, 0.02, 1.0), (0.1, 0.6, 0.9, 1.0), (0.9, 0.75, 0.0, 1.0), (0.05, 0.5, 0.1, 1.0),
               (0.6, 0.1, 0.7, 1.0), (0.9, 0.9, 0.9, 1.0), (0.2, 0.2, 0.2, 1.0)] + [(0.5, 0.5, 0.5, 1.0)] * 4
    return parts, colours


def fin_body() -> tuple[torch.Tensor, torch.Tensor]:
    """A box with a thin fin (0.15 voxel at 64^3) standing on its top: a part thinner than a voxel."""
    return concatenate(box((0.5, 0.4, 0.3), (0.0, 0.0, -0.1), n=4), box((0.3, 0.0025, 0.2), (0.0, 0.0, 0.149)))
