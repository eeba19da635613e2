"""`python -m backend texture MESH IMAGE -o OUT.glb` as a terminal user runs it: the file's own vertices and faces
come back bit for bit with a new material; its UVs are kept; errors are one clear line; Ctrl-C writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from backend.__main__ import main as cli
from backend.trellis2 import texturing

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--resolution", "512", "--texture-steps", "2", "--texture-size", "256"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[8:56, 8:56] = (220, 60, 30, 255)
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.fromarray(rgba).save(path)
    return path


def _sheet_with_uvs() -> trimesh.Trimesh:
    x, y = np.meshgrid(np.linspace(0, 1, 12), np.linspace(0, 1, 12), indexing="ij")
    vertices = np.stack([2 * x.ravel() + 3, 0.2 * np.sin(5 * x.ravel()), -1.5 * y.ravel()], axis=1)
    idx = np.arange(144).reshape(12, 12)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    uv = np.stack([x.ravel(), y.ravel()], axis=1) * 0.8 + 0.1
    return trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=uv), process=False)


def _read(path: Path) -> trimesh.Trimesh:
    return trimesh.load(str(path), force="mesh", process=False)


def test_a_glb_comes_back_with_its_own_vertices_faces_and_uvs(tmp_path, image, tiny_checkpoint, capsys) -> None:
    source = tmp_path / "sheet.glb"
    _sheet_with_uvs().export(str(source))
    out = tmp_path / "sheet_textured.glb"
    assert cli(["texture", str(source), str(image), "-o", str(out), "--weights", str(tiny_checkpoint), *FAST]) == 0
    err = capsys.readouterr().err
    assert "texture" in err and "100.0%" in err and "UVs kept" in err
    before, after = _read(source), _read(out)
    assert np.asarray(after.vertices, np.float32).tobytes() == np.asarray(before.vertices, np.float32).tobytes()
    np.testing.assert_array_equal(after.faces, before.faces)
    np.testing.assert_allclose(after.visual.uv, before.visual.uv, atol=1e-6)
    material = after.visual.material
    assert material.baseColorTexture.size == (256, 256) and material.metallicRoughnessTexture.size == (256, 256)


def test_an_obj_without_uvs_gets_an_atlas_and_keeps_its_vertices(tmp_path, image, tiny_checkpoint, capsys) -> None:
    m = trimesh.creation.icosphere(2, radius=3.0)
    m.apply_translation([1.0, 2.0, 3.0])
    source = tmp_path / "ball.obj"
    m.export(str(source))
    out = tmp_path / "ball.glb"
    assert cli(["texture", str(source), str(image), "-o", str(out), "--weights", str(tiny_checkpoint), *FAST]) == 0
    assert "new atlas" in capsys.readouterr().err
    before = _read(source)
    after = _read(out)
    n = len(before.vertices)
    assert len(after.vertices) >= n  # seam copies only
    assert np.asarray(after.vertices[:n], np.float32).tobytes() == np.asarray(before.vertices, np.float32).tobytes()
    np.testing.assert_array_equal(np.asarray(after.vertices)[after.faces], np.asarray(before.vertices, np.float32)
                                  [before.faces])


def test_bad_inputs_are_one_line_errors(tmp_path, image, tiny_checkpoint) -> None:
    flat = tmp_path / "flat.ply"
    trimesh.Trimesh(np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]]), np.array([[0, 1, 2]]), process=False).export(
        str(flat))
    for args, code, fragment in [
        ([str(flat), str(image)], 2, "degenerate"),
        ([str(tmp_path / "none.glb"), str(image)], 2, "no such mesh file"),
        ([str(flat), str(tmp_path / "none.png")], 2, "not found"),
        ([str(flat), str(image), "-o", str(tmp_path / "x.obj")], 2, "must be a .glb"),
        ([str(flat), str(image), "--texture-steps", "0"], 2, "texture_steps"),
        ([str(flat), str(image), "--texture-size", "300"], 2, "--texture-size"),
    ]:
        run = subprocess.run([sys.executable, "-m", "backend", "texture", *args, "--weights", str(tiny_checkpoint)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == code and fragment in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_ctrl_c_cancels_and_writes_nothing(tmp_path, image, tiny_checkpoint, monkeypatch, capsys) -> None:
    source = tmp_path / "sheet.glb"
    _sheet_with_uvs().export(str(source))
    real = texturing.TexturingPipeline.texture

    def interrupted(self, mesh, img, settings, progress=None):
        def ctrl_c(stage: str, step: int, total: int) -> None:
            progress(stage, step, total)
            if stage == "texture" and step == 1:
                raise KeyboardInterrupt
        return real(self, mesh, img, settings, ctrl_c)

    monkeypatch.setattr(texturing.TexturingPipeline, "texture", interrupted)
    out = tmp_path / "never.glb"
    assert cli(["texture", str(source), str(image), "-o", str(out), "--weights", str(tiny_checkpoint), *FAST]) == 130
    assert "cancelled; nothing was written" in capsys.readouterr().err and not out.exists()


def test_a_kept_texturing_result_is_baked_again_without_the_pipeline(tmp_path, image, tiny_checkpoint) -> None:
    source = tmp_path / "sheet.glb"
    _sheet_with_uvs().export(str(source))
    voxels = tmp_path / "sheet.npz"
    run = subprocess.run([sys.executable, "-m", "backend", "texture", str(source), str(image), "-o", str(voxels),
                          "--weights", str(tiny_checkpoint), *FAST], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and voxels.is_file(), run.stderr
    out = tmp_path / "again.glb"
    run = subprocess.run([sys.executable, "-m", "backend", "texture", str(source), str(voxels), "-o", str(out),
                          "--texture-size", "512", "--weights", str(tmp_path / "no-weights-needed")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    from backend.asset.glb import read_glb

    assert read_glb(out).base_color.shape == (512, 512, 4)
    bad = subprocess.run([sys.executable, "-m", "backend", "texture", str(source), str(tmp_path / "none.npz")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "not found" in bad.stderr
