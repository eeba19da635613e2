"""`python -m backend tiny-checkpoint` + `python -m backend generate` as a terminal user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from backend.ovoxel.ovoxel import OVoxel

ROOT = Path(__file__).resolve().parents[2]
FAST = ("--sparse-structure-steps", "2", "--shape-steps", "2", "--texture-steps", "2")


def _backend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_tiny_checkpoint_then_generate_writes_an_ovoxel(tmp_path) -> None:
    weights = tmp_path / "tiny"
    assert _backend("tiny-checkpoint", str(weights)).returncode == 0
    assert (weights / "pipeline.json").is_file() and (weights / "dinov3").is_dir()
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[10:50, 20:70] = (90, 30, 200, 255)
    Image.fromarray(rgba).save(tmp_path / "thing.png")
    out = tmp_path / "thing.npz"
    run = _backend("generate", str(tmp_path / "thing.png"), "-o", str(out), "--weights", str(weights),
                   "--pipeline-type", "512", "--seed", "3", *FAST)
    assert run.returncode == 0, run.stderr
    assert "sparse_structure" in run.stderr and "100.0%" in run.stderr
    assert f"{'loading':<16} [" in run.stderr  # reading the models is on the progress line too
    ovoxel = OVoxel.load(out)
    assert ovoxel.resolution == 128 and ovoxel.metadata["seed"] == 3


def test_generate_writes_a_textured_glb_with_the_asset_settings(tmp_path, tiny_checkpoint) -> None:
    from backend.asset.glb import read_glb

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[8:56, 8:56] = (200, 40, 40, 255)
    Image.fromarray(rgba).save(tmp_path / "red.png")
    out = tmp_path / "red.glb"
    run = _backend("generate", str(tmp_path / "red.png"), "-o", str(out), "--weights", str(tiny_checkpoint),
                   *FAST, "--texture-size", "256", "--alpha-mode", "MASK")
    assert run.returncode == 0, run.stderr
    mesh = read_glb(out)
    assert mesh.base_color.shape == (256, 256, 4) and mesh.alpha_mode == "MASK"
    assert len(mesh.indices) > 0

    bad = _backend("generate", str(tmp_path / "red.png"), "--weights", str(tiny_checkpoint), "--texture-size", "300")
    assert bad.returncode == 2 and "--texture-size" in bad.stderr
    bad = _backend("generate", str(tmp_path / "red.png"), "--weights", str(tiny_checkpoint), "--faces", "10")
    assert bad.returncode == 2 and "faces" in bad.stderr and "[1000, 20000000]" in bad.stderr


def test_hostile_image_and_missing_weights_are_clear_errors(tmp_path, tiny_checkpoint) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    run = _backend("generate", str(bad), "-o", str(tmp_path / "x.npz"), "--weights", str(tiny_checkpoint))
    assert run.returncode == 1 and "hint:" in run.stderr and "Traceback" not in run.stderr

    run = _backend("generate", str(bad), "--weights", str(tmp_path / "nowhere"))
    assert run.returncode == 1 and "does not exist" in run.stderr and "Traceback" not in run.stderr
