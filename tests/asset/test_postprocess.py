"""The whole O-Voxel -> TexturedMesh build on voxelised analytic shapes with known colours."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from asset_shapes import pbr_pattern, sphere_sdf, torus_sdf, union, voxelize
from test_mesh_repair import directed_edges_agree, signed_volume

from backend.asset.meshutil import edges_of
from backend.errors import JobFailure
from backend.ovoxel.ovoxel import OVoxel
from backend.asset.postprocess import asset_stages, build_textured_mesh, manifold_surface
from backend.asset.remesh import remesh_narrow_band
from backend.asset.textured_mesh import AssetSettings


@pytest.fixture(scope="module")
def ovoxel() -> OVoxel:
    shape = union(sphere_sdf((0.0, 0.0, 0.0), 0.3, bump=0.1, freq=12), torus_sdf((0.0, 0.0, 0.0), 0.33, 0.06))
    return voxelize(shape, 64, lipschitz=1.5)  # ~18k dual-grid faces


def texel_lookup(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    t = image.shape[0]
    col = np.clip((uv[:, 0] * t).astype(int), 0, t - 1)
    row = np.clip(((1 - uv[:, 1]) * t).astype(int), 0, t - 1)
    return image[row, col].astype(np.float64) / 255


def test_build_matches_the_source_colours(ovoxel: OVoxel) -> None:
    stages: list[str] = []
    settings = AssetSettings(faces=8000, texture_size=512)
    mesh = build_textured_mesh(ovoxel, settings, device="cpu", progress=lambda stage, step, total: stages.append(stage))
    assert list(dict.fromkeys(stages)) == [s.name for s in asset_stages(settings)]
    assert 0.97 * 8000 <= mesh.indices.shape[0] <= 8000
    assert mesh.positions.dtype == np.float32 and mesh.indices.dtype == np.int32
    assert np.allclose(np.linalg.norm(mesh.normals, axis=1), 1, atol=1e-4)
    assert mesh.uvs.min() >= 0 and mesh.uvs.max() <= 1
    assert mesh.base_color.shape == (512, 512, 4) and mesh.metallic_roughness.shape == (512, 512, 3)
    assert not mesh.double_sided  # closed shapes
    # Colours read back at the vertices' UVs agree with the pattern evaluated at the vertices.
    expected = pbr_pattern(torch.from_numpy(mesh.positions)).numpy()
    rgba = texel_lookup(mesh.base_color, mesh.uvs)
    mr = texel_lookup(mesh.metallic_roughness, mesh.uvs)
    assert np.abs(rgba[:, :3] - expected[:, :3]).mean() < 0.02
    assert np.percentile(np.abs(rgba[:, :3] - expected[:, :3]), 95) < 0.06
    assert np.abs(mr[:, 2] - expected[:, 3]).mean() < 0.03  # metallic in B
    assert np.abs(mr[:, 1] - expected[:, 4]).mean() < 0.03  # roughness in G
    assert np.all(mesh.metallic_roughness[..., 0] == 0)
    # Alpha: 0.4 where x > 0.2 (away from the border), 1 elsewhere, and AUTO turns on blending. (A vertex on a
    # chart border may read a gutter texel, hence percentiles.)
    x = mesh.positions[:, 0]
    assert np.percentile(np.abs(rgba[x > 0.25, 3] - 0.4), 98) < 0.02
    assert np.percentile(np.abs(rgba[x < 0.15, 3] - 1), 98) < 0.02
    assert mesh.alpha_mode == "BLEND"


def test_alpha_mode_and_double_sided(ovoxel: OVoxel) -> None:
    opaque = OVoxel(ovoxel.coords, pbr_pattern(torch.from_numpy((ovoxel.coords + 0.5) / 64 - 0.5).float(),
                                               alpha=1.0).numpy(), 64, ovoxel.vertices, ovoxel.faces)
    settings = AssetSettings(faces=2000, texture_size=256)
    assert build_textured_mesh(opaque, settings, device="cpu").alpha_mode == "OPAQUE"
    masked = build_textured_mesh(opaque, AssetSettings(faces=2000, texture_size=256, alpha_mode="MASK",
                                                       alpha_cutoff=0.3), device="cpu")
    assert masked.alpha_mode == "MASK" and masked.alpha_cutoff == 0.3
    # Cut the top off: a big open boundary that hole filling must leave, so the material is double-sided.
    centre_z = ovoxel.vertices[ovoxel.faces].mean(axis=1)[:, 2]
    cut = OVoxel(ovoxel.coords, ovoxel.attrs, 64, ovoxel.vertices, ovoxel.faces[centre_z < 0.15])
    assert build_textured_mesh(cut, settings, device="cpu").double_sided


@pytest.mark.parametrize("faces", [np.zeros((0, 3), np.int32), np.array([[0, 0, 0], [0, 1, 1], [2, 2, 2]], np.int32)])
def test_a_surface_with_nothing_to_build_is_a_job_failure(faces: np.ndarray) -> None:
    vertices = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]], np.float32)
    empty = OVoxel(np.zeros((1, 3), np.int32), np.ones((1, 6), np.float32), 64, vertices, faces)
    with pytest.raises(JobFailure) as info:
        build_textured_mesh(empty, AssetSettings(faces=2000, texture_size=256), device="cpu")
    assert info.value.code == "job_failed" and "produced no surface" in info.value.message
    assert info.value.hint == "try another seed or image"


def test_cancel_from_progress(ovoxel: OVoxel) -> None:
    class Cancelled(Exception):
        pass

    def progress(stage: str, step: int, total: int) -> None:
        if stage == "uv":
            raise Cancelled

    with pytest.raises(Cancelled):
        build_textured_mesh(ovoxel, AssetSettings(faces=2000, texture_size=256), progress=progress, device="cpu")


def test_remesh_gives_a_closed_outward_shell() -> None:
    ov = voxelize(sphere_sdf((0.02, 0.0, 0.0), 0.3), 32)
    v, f, _ = manifold_surface(torch.from_numpy(ov.vertices), torch.from_numpy(ov.faces), 3e-2, 1e-3)
    rv, rf = remesh_narrow_band(v, f, 32, band=1.0)
    edges = edges_of(rf, rv.shape[0])
    assert bool((edges.count == 2).all())
    assert directed_edges_agree(rf)
    r = (rv - torch.tensor([0.02, 0.0, 0.0])).norm(dim=1)
    outer, inner = r[r > 0.3], r[r < 0.3]
    h = 1 / 32
    assert abs(float(outer.mean()) - (0.3 + h)) < 0.2 * h and abs(float(inner.mean()) - (0.3 - h)) < 0.2 * h
    shell = 4 / 3 * torch.pi * ((0.3 + h) ** 3 - (0.3 - h) ** 3)  # outer faces out, inner faces in
    assert abs(signed_volume(rv, rf) - shell) < 0.1 * shell


def test_build_with_remesh(ovoxel: OVoxel) -> None:
    small = voxelize(sphere_sdf((0.0, 0.0, 0.0), 0.3), 32)
    mesh = build_textured_mesh(small, AssetSettings(faces=3000, texture_size=256, remesh=True), device="cpu")
    assert not mesh.double_sided
    assert mesh.indices.shape[0] <= 3000
    expected = pbr_pattern(torch.from_numpy(mesh.positions)).numpy()
    rgb = texel_lookup(mesh.base_color, mesh.uvs)[:, :3]
    assert np.abs(rgb - expected[:, :3]).mean() < 0.05  # the shell sits a voxel off the coloured surface


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_build_matches_cpu(ovoxel: OVoxel) -> None:
    settings = AssetSettings(faces=4000, texture_size=256)
    cpu = build_textured_mesh(ovoxel, settings, device="cpu")
    gpu = build_textured_mesh(ovoxel, settings, device="cuda")
    assert abs(gpu.indices.shape[0] - cpu.indices.shape[0]) <= 0.02 * cpu.indices.shape[0]
    assert abs(gpu.metadata["uv_utilization"] - cpu.metadata["uv_utilization"]) < 0.05
    assert gpu.alpha_mode == cpu.alpha_mode and gpu.double_sided == cpu.double_sided
