"""Baking a texturing result onto the caller's own mesh: the texel's own surface point, the caller's UVs kept when
usable, the caller's vertices and faces untouched, seams split only for export; hostile meshes refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import trimesh

from backend.asset.bake_onto import BAKE_STAGES, bake_onto, textured_mesh, uv_problem
from backend.asset.textured_mesh import AssetSettings
from backend.ovoxel.encode import normalize_to_unit_cube
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.user_mesh import MeshInputError, UserMesh
from backend.ovoxel.voxelizer import mesh_to_flexible_dual_grid

R = 64
SIZE = 256


def colour_of(normalized: np.ndarray) -> np.ndarray:
    """[N, 6] PBR attributes that vary linearly over the unit cube (a known field to bake)."""
    out = np.empty((normalized.shape[0], 6), np.float32)
    out[:, :3] = 0.5 + 0.8 * normalized
    out[:, 3], out[:, 4], out[:, 5] = 0.25, 0.75, 1.0
    return out


def field_voxels(mesh: UserMesh, alpha: float = 1.0) -> OVoxel:
    """What the texturing pipeline hands over, with `colour_of` as the decoded attributes."""
    normalized, center, scale = normalize_to_unit_cube(mesh.positions.astype(np.float64))
    grid = mesh_to_flexible_dual_grid(torch.from_numpy(normalized).float(), torch.from_numpy(mesh.faces), R)
    coords = grid.coords.numpy()
    attrs = colour_of((coords + 0.5) / R - 0.5)
    attrs[:, 5] = alpha
    return OVoxel(coords, attrs, R, normalized.astype(np.float32), mesh.faces.astype(np.int32),
                  metadata={"center": center.tolist(), "scale": float(scale)})


def wavy_sheet(n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An open sheet in the caller's own frame (offset, scaled) with UVs u, v = its grid position."""
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="ij")
    positions = np.stack([3 * u, 2 * v, 0.3 * np.sin(4 * u) * np.cos(3 * v)], axis=-1).reshape(-1, 3) + [10, -4, 2]
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return positions.astype(np.float32), faces, np.stack([u.ravel(), v.ravel()], axis=1)


def texel_points(mesh: UserMesh, uvs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(texel rows/cols [M, 2], their surface points [M, 3]) at the centres of UV triangles, for checking."""
    corners = mesh.positions.astype(np.float64)[mesh.faces]
    centroid_uv = uvs.mean(axis=1)
    rc = np.stack([((1 - centroid_uv[:, 1]) * SIZE).astype(int), (centroid_uv[:, 0] * SIZE).astype(int)], axis=1)
    return rc.clip(0, SIZE - 1), corners.mean(axis=1)


def test_texels_take_the_voxels_at_their_own_surface_point_and_the_uvs_are_kept() -> None:
    positions, faces, uv = wavy_sheet()
    mesh = UserMesh.checked(positions, faces, uv)
    voxels = field_voxels(mesh)
    events: list[tuple[str, int, int]] = []
    baked = bake_onto(mesh, voxels, AssetSettings(texture_size=SIZE), lambda *e: events.append(e), device="cpu")
    assert list(dict.fromkeys(stage for stage, _, _ in events)) == [s.name for s in BAKE_STAGES]
    assert baked.uvs_kept and baked.metadata["uvs"] == "kept"
    np.testing.assert_array_equal(baked.uvs, uv[faces].astype(np.float32))
    rc, points = texel_points(mesh, baked.uvs)
    normalized = (points - np.asarray(voxels.metadata["center"])) * voxels.metadata["scale"]
    expected = np.clip(colour_of(normalized)[:, :3], 0, 1) * 255
    got = baked.base_color[rc[:, 0], rc[:, 1], :3].astype(np.float64)
    assert np.abs(got - expected).max() < 6, np.abs(got - expected).max()  # trilinear on a linear field, 8-bit
    assert (baked.metallic_roughness[..., 2] == 64).all() and (baked.metallic_roughness[..., 1] == 191).all()
    assert baked.alpha_mode == "OPAQUE" and baked.double_sided  # opaque voxels; an open sheet


def test_export_keeps_every_vertex_and_face_and_adds_no_vertex_for_per_vertex_uvs() -> None:
    positions, faces, uv = wavy_sheet()
    positions = np.concatenate([positions, [[99.0, 99.0, 99.0]]]).astype(np.float32)  # an unreferenced vertex
    uv = np.concatenate([uv, [[0.5, 0.5]]])
    mesh = UserMesh.checked(positions, faces, uv)
    out = textured_mesh(mesh, bake_onto(mesh, field_voxels(mesh), AssetSettings(texture_size=SIZE), device="cpu"))
    assert out.positions.tobytes() == positions.tobytes()
    np.testing.assert_array_equal(out.indices, faces)
    np.testing.assert_array_equal(out.uvs[:-1], uv[:-1].astype(np.float32))


@pytest.mark.parametrize("bad, reason", [
    (lambda uv: None, "no UVs"),
    (lambda uv: uv * 3 - 1, "outside [0, 1]"),
    (lambda uv: np.zeros_like(uv), "degenerate"),
    (lambda uv: np.where(uv > 0.5, np.nan, uv), "not finite"),
])
def test_unusable_uvs_get_a_new_atlas_and_only_seam_splits(bad, reason) -> None:
    positions, faces, uv = wavy_sheet()
    mesh = UserMesh.checked(positions, faces, bad(uv))
    assert reason in uv_problem(mesh)
    baked = bake_onto(mesh, field_voxels(mesh), AssetSettings(texture_size=SIZE), device="cpu")
    assert not baked.uvs_kept and reason in baked.metadata["uvs"]
    assert baked.uvs.shape == (faces.shape[0], 3, 2) and (baked.uvs >= 0).all() and (baked.uvs <= 1).all()
    out = textured_mesh(mesh, baked)
    assert out.positions[:len(positions)].tobytes() == positions.tobytes()  # originals first, in order
    extra = out.positions.shape[0] - len(positions)
    copies = out.positions[len(positions):]
    assert extra >= 0 and all((positions == p).all(axis=1).any() for p in copies)  # seam copies of real vertices
    np.testing.assert_array_equal(out.uvs[out.indices].reshape(-1, 2), baked.uvs.reshape(-1, 2))
    np.testing.assert_array_equal(out.positions[out.indices], positions[faces])  # same triangles


def test_a_closed_mesh_is_covered_and_transparent_voxels_blend() -> None:
    m = trimesh.creation.icosphere(3, radius=1.7)
    m.apply_translation([0.3, -2.0, 5.0])
    mesh = UserMesh.checked(np.asarray(m.vertices), np.asarray(m.faces))
    baked = bake_onto(mesh, field_voxels(mesh, alpha=0.5), AssetSettings(texture_size=SIZE), device="cpu")
    assert baked.metadata["coverage"] > 0.3 and not baked.double_sided
    assert baked.alpha_mode == "BLEND" and np.abs(baked.base_color[..., 3].astype(int) - 128).max() <= 1
    opaque = bake_onto(mesh, field_voxels(mesh, alpha=0.5), AssetSettings(texture_size=SIZE, alpha_mode="OPAQUE"),
                       device="cpu")
    assert opaque.alpha_mode == "OPAQUE"


# ---------------------------------------------------------------------------------------------------------------
# Hostile meshes

TRIANGLE = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@pytest.mark.parametrize("positions, faces, uvs, fragment", [
    (np.zeros((0, 3)), np.zeros((0, 3), np.int64), None, "empty"),
    (TRIANGLE, np.zeros((0, 3), np.int64), None, "empty"),
    (np.array([[0.0, 0.0, np.nan], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]), None, "not finite"),
    (np.array([[0.0, 0.0, np.inf], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]), None, "not finite"),
    (TRIANGLE, np.array([[0, 1, 3]]), None, "face indices must lie in"),
    (TRIANGLE, np.array([[0, -1, 2]]), None, "face indices must lie in"),
    (TRIANGLE, np.array([[0, 1, 1], [2, 2, 2]]), None, "degenerate"),
    (np.array([[0.0, 0, 0], [1, 1, 1], [2, 2, 2]]), np.array([[0, 1, 2]]), None, "degenerate"),
    (TRIANGLE[:, :2], np.array([[0, 1, 2]]), None, "float [V, 3]"),
    (TRIANGLE.astype(np.int64), np.array([[0, 1, 2]]), None, "float [V, 3]"),
    (TRIANGLE, np.array([[0.0, 1.0, 2.0]]), None, "integer [F, 3]"),
    (TRIANGLE, np.array([[0, 1, 2]]), np.zeros((2, 2)), "UVs must be per face corner"),
])
def test_hostile_meshes_are_refused_with_the_problem_and_a_fix(positions, faces, uvs, fragment) -> None:
    with pytest.raises(MeshInputError, match=re.escape(fragment)) as info:
        UserMesh.checked(positions, faces, uvs)
    assert info.value.hint


def test_size_limit() -> None:
    faces = np.array([[0, 1, 2]] * 11)
    with pytest.raises(MeshInputError, match="too large.*limit is 10 faces"):
        UserMesh.checked(TRIANGLE, faces, max_faces=10)
    assert UserMesh.checked(TRIANGLE, faces, max_faces=11).faces.dtype == np.int64
