"""Procedural objects whose voxel structure stands in for a real asset's in the random-weight benchmark.

Random networks have no idea what an object looks like: left alone they occupy a random fraction of every grid.
Token counts decide the flows' cost (attention is quadratic in them) and voxel counts the decoders', so the
benchmark makes the random pipeline see an object's structure instead: each object is a few overlapping
primitives (a real asset's parts overlap too, and every part's surface is voxelised). It exists twice, as a
triangle mesh (trimesh primitives) and as exact distance functions of the same primitives:
- the sparse structure (64^3) is the project's own mesh -> O-Voxel voxeliser (`mesh_to_dual_grid`) on the mesh;
- every subdivision below it keeps a child voxel when the surface passes through its cell (distance from the
  cell centre to the nearest part's surface within half the cell diagonal), at any resolution, on the GPU.
Coordinates follow the O-Voxel frame: points in [-0.5, 0.5]^3, voxel (x, y, z) at resolution R covers
[x, x + 1] / R - 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from backend.ovoxel.encode import mesh_to_dual_grid, normalize_to_unit_cube

# A cell counts as crossed when the surface comes within this many cell sizes of its centre. An exact test would
# need the surface's orientation: a plane through a cube's centre region crosses it within 0.5 (axis-aligned) to
# 0.87 (diagonal) cell sizes, and 0.7 reproduces the encoder's 64^3 voxel counts within about 15% on OBJECTS.
CROSSING_RADIUS = 0.7


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    return trimesh.transformations.euler_matrix(*np.radians(degrees), "sxyz")[:3, :3]


@dataclass(frozen=True)
class Part:
    """One primitive in its own frame (z up), then rotated by `degrees` (x, y, z) and moved to `center`.

    size: sphere (r,); box (half x, half y, half z); capsule (half length of the axis, r);
    cylinder (r, half height); torus (ring radius, tube radius).
    """

    kind: str
    size: tuple[float, ...]
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    degrees: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def mesh(self) -> trimesh.Trimesh:
        s = self.size
        makers = {
            "sphere": lambda: trimesh.creation.icosphere(subdivisions=4, radius=s[0]),
            "box": lambda: trimesh.creation.box(extents=[2 * s[0], 2 * s[1], 2 * s[2]]),
            "capsule": lambda: trimesh.creation.capsule(height=2 * s[0], radius=s[1], count=[32, 32]),
            "cylinder": lambda: trimesh.creation.cylinder(radius=s[0], height=2 * s[1], sections=64),
            "torus": lambda: trimesh.creation.torus(major_radius=s[0], minor_radius=s[1], major_sections=64,
                                                    minor_sections=24),
        }
        if self.kind not in makers:
            raise ValueError(f"unknown part kind {self.kind!r}; known: {sorted(makers)}")
        mesh = makers[self.kind]()
        transform = np.eye(4)
        transform[:3, :3] = _rotation(self.degrees)
        transform[:3, 3] = self.center
        return mesh.apply_transform(transform)

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        """Unsigned distance [N] from points [N, 3] (float32, the part's world frame) to the part's surface."""
        rot = torch.as_tensor(_rotation(self.degrees), dtype=points.dtype, device=points.device)
        p = (points - torch.tensor(self.center, dtype=points.dtype, device=points.device)) @ rot  # local frame
        s = self.size
        if self.kind == "sphere":
            d = p.norm(dim=1) - s[0]
        elif self.kind == "box":
            q = p.abs() - torch.tensor(s, dtype=p.dtype, device=p.device)
            d = q.clamp_min(0).norm(dim=1) + q.max(dim=1).values.clamp_max(0)
        elif self.kind == "capsule":
            axis = p[:, 2].clamp(-s[0], s[0])
            d = torch.stack([p[:, 0], p[:, 1], p[:, 2] - axis], dim=1).norm(dim=1) - s[1]
        elif self.kind == "cylinder":
            q = torch.stack([p[:, :2].norm(dim=1) - s[0], p[:, 2].abs() - s[1]], dim=1)
            d = q.clamp_min(0).norm(dim=1) + q.max(dim=1).values.clamp_max(0)
        else:  # torus
            d = torch.stack([p[:, :2].norm(dim=1) - s[0], p[:, 2]], dim=1).norm(dim=1) - s[1]
        return d.abs()


class ProceduralObject:
    """Parts scaled together into the unit cube, as the reference prepares its data (`normalize_to_unit_cube`)."""

    def __init__(self, name: str, parts: list[Part]) -> None:
        self.name, self.parts = name, parts
        meshes = [part.mesh() for part in parts]
        vertices = np.concatenate([m.vertices for m in meshes])
        offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
        self.faces = np.concatenate([m.faces + o for m, o in zip(meshes, offsets)]).astype(np.int64)
        self.vertices, self.center, self.scale = normalize_to_unit_cube(vertices)

    def surface_distance(self, points: torch.Tensor) -> torch.Tensor:
        """Distance [N] from unit-cube points [N, 3] to the nearest part's surface."""
        world = points / self.scale + torch.tensor(self.center, dtype=points.dtype, device=points.device)
        return torch.stack([part.distance(world) for part in self.parts]).min(dim=0).values * self.scale

    def crosses(self, coords: torch.Tensor, resolution: int) -> torch.Tensor:
        """bool [N]: whether the surface passes through voxel coords [N, 3] at `resolution`."""
        centres = (coords.float() + 0.5) / resolution - 0.5
        return self.surface_distance(centres) <= CROSSING_RADIUS / resolution

    def structure(self, resolution: int) -> torch.Tensor:
        """int32 [N, 3]: the voxels of the O-Voxel the project's encoder makes of this mesh at `resolution`."""
        return torch.from_numpy(mesh_to_dual_grid(self.vertices, self.faces, resolution).coords)


def figure() -> ProceduralObject:
    """A standing figure with shield, spear, cape and base: about the 64^3 / 96^3 token counts of a T.png-like
    asset (performance.md: ~18k and ~40k)."""
    return ProceduralObject("figure", [
        Part("sphere", (0.17,), (0.0, 0.0, 0.8)),  # head
        Part("cylinder", (0.2, 0.03), (0.0, 0.0, 0.86)),  # hat brim
        Part("box", (0.24, 0.15, 0.3), (0.0, 0.0, 0.33)),  # torso
        Part("capsule", (0.24, 0.075), (-0.36, 0.0, 0.4), (0.0, 60.0, 0.0)),  # arms
        Part("capsule", (0.24, 0.075), (0.36, 0.0, 0.4), (0.0, -60.0, 0.0)),
        Part("capsule", (0.26, 0.09), (-0.12, 0.0, -0.24)),  # legs
        Part("capsule", (0.26, 0.09), (0.12, 0.0, -0.24)),
        Part("torus", (0.25, 0.04), (0.0, 0.0, 0.07)),  # belt
        Part("box", (0.18, 0.09, 0.22), (0.0, -0.24, 0.38)),  # backpack
        Part("cylinder", (0.32, 0.025), (0.62, 0.15, 0.35), (90.0, 0.0, 0.0)),  # shield
        Part("box", (0.02, 0.02, 0.45), (-0.62, 0.1, 0.5)),  # spear
        Part("box", (0.3, 0.02, 0.45), (0.0, -0.36, 0.2)),  # cape
        Part("cylinder", (0.5, 0.04), (0.0, 0.0, -0.56)),  # base
        Part("torus", (0.42, 0.05), (0.0, 0.0, -0.52)),  # base rim
    ])


def chair() -> ProceduralObject:
    """Seat, back, four legs and two cross bars: thin parts, many voxels per token."""
    legs = [Part("cylinder", (0.035, 0.3), (x, y, -0.3)) for x in (-0.33, 0.33) for y in (-0.33, 0.33)]
    return ProceduralObject("chair", [
        Part("box", (0.4, 0.4, 0.04), (0.0, 0.0, 0.02)),
        Part("box", (0.4, 0.035, 0.36), (0.0, 0.36, 0.42)),
        *legs,
        Part("cylinder", (0.02, 0.33), (0.0, -0.33, -0.35), (0.0, 90.0, 0.0)),
        Part("cylinder", (0.02, 0.33), (0.0, 0.33, -0.35), (0.0, 90.0, 0.0)),
    ])


def teapot() -> ProceduralObject:
    """Round body, lid, knob, handle and spout: smooth, compact."""
    return ProceduralObject("teapot", [
        Part("sphere", (0.42,)),
        Part("cylinder", (0.22, 0.05), (0.0, 0.0, 0.42)),
        Part("sphere", (0.06,), (0.0, 0.0, 0.5)),
        Part("torus", (0.18, 0.035), (-0.48, 0.0, 0.05), (90.0, 0.0, 0.0)),
        Part("capsule", (0.18, 0.05), (0.5, 0.0, 0.12), (0.0, 50.0, 0.0)),
    ])


OBJECTS = {"figure": figure, "chair": chair, "teapot": teapot}
