"""`python -m backend ovoxel encode|decode`: file formats, up axes, materials, textures, errors, and the decode
path to a GLB (with a stand-in post-processing, and once with the real one)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import trimesh
from PIL import Image
from trimesh.visual import TextureVisuals
from trimesh.visual.material import PBRMaterial

from backend import ovoxel_cli as cli
from backend.asset.glb import read_glb
from backend.ovoxel.ovoxel import OVoxel
from backend.asset.textured_mesh import TexturedMesh


def tall_textured_glb(path) -> None:
    """A sphere stretched along glTF's up axis (Y); UV v follows height, the texture's top half is red and its
    bottom half blue, so the O-Voxel must come out tall in Z with red voxels on top."""
    m = trimesh.creation.icosphere(3, radius=1.0)
    m.apply_scale([0.4, 1.0, 0.4])
    uv = np.stack([np.full(len(m.vertices), 0.5), (m.vertices[:, 1] + 1) / 2], axis=1)
    tex = np.zeros((64, 64, 4), np.uint8)
    tex[:32] = (255, 0, 0, 255)
    tex[32:] = (0, 0, 255, 255)
    m.visual = TextureVisuals(uv=uv, material=PBRMaterial(baseColorTexture=Image.fromarray(tex), metallicFactor=0.25,
                                                          roughnessFactor=0.75))
    m.export(path)


def test_encode_glb_converts_axes_and_samples_the_texture(tmp_path, capsys) -> None:
    tall_textured_glb(tmp_path / "tall.glb")
    assert cli.main(["ovoxel", "encode", str(tmp_path / "tall.glb"), "-o", str(tmp_path / "x.npz"),
                     "--resolution", "32"]) == 0
    out = capsys.readouterr()
    assert "encode: voxelize" in out.err and "wrote" in out.out
    ov = OVoxel.load(tmp_path / "x.npz")
    extent = ov.coords.max(axis=0) - ov.coords.min(axis=0)
    assert extent[2] > 2 * extent[0] and extent[2] > 2 * extent[1]
    assert ov.metadata["up_axis"] == "y" and ov.metadata["source"] == "tall.glb"
    z = ov.coords[:, 2] - 16
    top, bottom = (z > 1) & (z < 14), (z < -2) & (z > -15)  # the poles blend in the other half (repeat wrap)
    assert (ov.attrs[top, 0] > 0.99).all() and (ov.attrs[top, 2] < 0.01).all()
    assert (ov.attrs[bottom, 2] > 0.99).all() and (ov.attrs[bottom, 0] < 0.01).all()
    np.testing.assert_allclose(ov.attrs[:, 3:], np.tile([0.25, 0.75, 1.0], (len(ov.attrs), 1)), atol=1e-6)
    assert ov.dual_vertices is not None and len(ov.faces) > 0


def test_encode_stl_is_z_up_and_plain(tmp_path) -> None:
    m = trimesh.creation.box((0.2, 0.3, 1.0))
    m.export(tmp_path / "box.stl")
    assert cli.main(["ovoxel", "encode", str(tmp_path / "box.stl"), "-o", str(tmp_path / "b.npz"),
                     "--resolution", "16"]) == 0
    ov = OVoxel.load(tmp_path / "b.npz")
    extent = ov.coords.max(axis=0) - ov.coords.min(axis=0)
    assert extent.argmax() == 2 and ov.metadata["up_axis"] == "z"
    np.testing.assert_allclose(ov.attrs, np.tile([1, 1, 1, 0, 1, 1], (len(ov.attrs), 1)))


def test_texture_option_replaces_the_base_colour(tmp_path) -> None:
    tall_textured_glb(tmp_path / "tall.glb")
    Image.fromarray(np.full((8, 8, 3), (0, 255, 0), np.uint8)).save(tmp_path / "green.png")
    assert cli.main(["ovoxel", "encode", str(tmp_path / "tall.glb"), "-o", str(tmp_path / "g.npz"),
                     "--resolution", "16", "--texture", str(tmp_path / "green.png")]) == 0
    ov = OVoxel.load(tmp_path / "g.npz")
    np.testing.assert_allclose(ov.attrs[:, :3], np.tile([0, 1, 0], (len(ov.attrs), 1)), atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["encode", "{d}/missing.obj", "-o", "{d}/x.npz"], "no such mesh file"),
    (["encode", "{d}/notes.obj", "-o", "{d}/x.npz"], "no triangles"),
    (["encode", "{d}/box.stl", "-o", "{d}/x.npz", "--resolution", "4"], "--resolution"),
    (["encode", "{d}/box.stl", "-o", "{d}/x.glb"], ".npz"),
    (["encode", "{d}/box.stl", "-o", "{d}/x.npz", "--texture", "{d}/notes.obj"], "cannot read the texture"),
    (["encode", "{d}/box.stl", "-o", "{d}/x.npz", "--texture", "{d}/t.png"], "needs UVs"),
    (["decode", "{d}/missing.npz", "-o", "{d}/x.glb"], "no such O-Voxel"),
    (["decode", "{d}/notes.obj", "-o", "{d}/x.glb"], "not a valid O-Voxel"),
    (["decode", "{d}/box.stl", "-o", "{d}/x.npz"], ".glb"),
    (["decode", "{d}/notes.obj", "-o", "{d}/x.glb", "--faces", "10"], "faces"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, args: list[str], message: str) -> None:
    trimesh.creation.box((0.2, 0.3, 0.4)).export(tmp_path / "box.stl")
    (tmp_path / "notes.obj").write_text("not a mesh\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "t.png")
    assert cli.main(["ovoxel", *[a.format(d=tmp_path) for a in args]]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_register_adds_the_command_to_a_parent_parser() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ovoxel", "decode", "a.npz", "-o", "b.glb", "--remesh", "--alpha-mode", "MASK"])
    assert args.remesh and args.alpha_mode == "MASK" and callable(args.run)


def _encode_sphere(tmp_path, colour=(0.9, 0.1, 0.1, 1.0)) -> None:
    from backend.ovoxel.encode import Material, SurfaceMesh, encode_mesh

    m = trimesh.creation.icosphere(3, radius=0.35)
    material = Material(base_color=colour, metallic=0.2, roughness=0.6)
    encode_mesh(SurfaceMesh(np.asarray(m.vertices), np.asarray(m.faces), material=material), 32).save(
        tmp_path / "s.npz")


def test_decode_passes_settings_and_writes_the_glb(tmp_path, monkeypatch) -> None:
    """The CLI's own decode path, with a stand-in for the post-processing: the O-Voxel's raw mesh, flat colour."""
    _encode_sphere(tmp_path)
    seen = {}

    def fake_build(ovoxel, settings, progress, device):
        seen.update(settings=settings, device=device)
        progress("bake", 1, 1)
        keep, faces = np.unique(ovoxel.faces, return_inverse=True)
        v = ovoxel.vertices[keep]
        return TexturedMesh(positions=v, indices=faces.reshape(-1, 3).astype(np.int32),
                            normals=v / np.linalg.norm(v, axis=1, keepdims=True), uvs=np.zeros((len(v), 2), np.float32),
                            base_color=np.full((4, 4, 4), 200, np.uint8),
                            metallic_roughness=np.zeros((4, 4, 3), np.uint8),
                            alpha_mode="MASK", alpha_cutoff=settings.alpha_cutoff, double_sided=True)

    monkeypatch.setattr(cli, "build_textured_mesh", fake_build)
    assert cli.main(["ovoxel", "decode", str(tmp_path / "s.npz"), "-o", str(tmp_path / "s.glb"), "--faces", "5000",
                     "--texture-size", "512", "--remesh", "--alpha-mode", "MASK", "--alpha-cutoff", "0.25",
                     "--device", "cpu"]) == 0
    s = seen["settings"]
    assert (s.faces, s.texture_size, s.remesh, s.alpha_mode, s.alpha_cutoff) == (5000, 512, True, "MASK", 0.25)
    assert seen["device"] == "cpu"
    glb = read_glb(tmp_path / "s.glb")
    ov = OVoxel.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(glb.positions, ov.vertices[np.unique(ov.faces)])
    assert glb.alpha_mode == "MASK" and glb.alpha_cutoff == pytest.approx(0.25) and glb.double_sided


def test_decode_end_to_end_with_the_real_post_processing(tmp_path) -> None:
    pytest.importorskip("backend.asset.postprocess")
    _encode_sphere(tmp_path)
    assert cli.main(["ovoxel", "decode", str(tmp_path / "s.npz"), "-o", str(tmp_path / "s.glb"), "--faces", "1000",
                     "--texture-size", "256"]) == 0
    glb = read_glb(tmp_path / "s.glb")
    radius = np.linalg.norm(glb.positions, axis=1)
    assert np.abs(radius - 0.35).max() < 1.5 / 32
    t = glb.base_color.shape[0]
    row = ((1 - glb.uvs[:, 1]) * t).astype(int).clip(0, t - 1)
    texel = glb.base_color[row, (glb.uvs[:, 0] * t).astype(int).clip(0, t - 1)]
    # The factor (0.9, 0.1, 0.1) is linear (glTF): the sRGB texture holds (243, 89, 89), within 2/255 everywhere.
    assert np.abs(texel[:, :3].astype(float) - np.array([243, 89, 89])).max() <= 2
    assert glb.alpha_mode == "OPAQUE" and not glb.double_sided
