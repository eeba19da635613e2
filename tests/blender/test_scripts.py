"""The two scripts users run: the documented batch example (examples/batch_folder.py, run as `blender -b --python`
would run it) and `./trellis2 generate`'s driver (tools/image_to_blend.py, as a subprocess), against a fake backend."""

from __future__ import annotations

import runpy
import subprocess
import sys

import bpy
import pytest
from protocol_fakes import FakeServer

import synthetic
from conftest import ROOT
from addon_fakes import backend_handler


@pytest.fixture
def fake_server():
    server = FakeServer(backend_handler())
    yield server
    server.stop()


def test_the_batch_example_turns_a_folder_into_one_blend_and_glbs(scene, fake_server, tmp_path, capsys,
                                                                  monkeypatch) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b_mug.png", "a_chair.png"):
        (folder / name).write_bytes(synthetic.subject_png(32))
    (folder / "notes.txt").write_text("not an image, skipped")
    (folder / "c_broken.png").write_text("not a png either: reported, skipped")
    out = tmp_path / "out" / "batch.blend"
    monkeypatch.setattr(sys, "argv", ["blender", "-b", "--python", "batch_folder.py", "--", str(folder), "-o",
                                      str(out), "--glb-dir", str(tmp_path / "glb"), "--server", fake_server.address])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / "batch_folder.py"), run_name="__main__")
    assert exit_info.value.code == 1  # c_broken.png failed
    printed = capsys.readouterr().out
    assert "[1/3] a_chair.png" in printed and "TRELLIS.2 a_chair: shape 3/3" in printed
    assert "failed: TRELLIS.2: " in printed and "[invalid_image]" in printed
    assert "wrote " + str(out) + ": 2 of 3 images; failed: c_broken.png" in printed
    assert sorted(p.name for p in (tmp_path / "glb").iterdir()) == ["a_chair.glb", "b_mug.glb"]
    bpy.ops.wm.open_mainfile(filepath=str(out))
    objects = {o.name: tuple(o.location) for o in bpy.data.objects}
    assert objects == {"a_chair": (0.0, 0.0, 0.0), "b_mug": (1.5, 0.0, 0.0)}


def test_image_to_blend_writes_a_blend_with_the_object(fake_server, tmp_path) -> None:
    image = tmp_path / "lamp.png"
    image.write_bytes(synthetic.subject_png(32))
    out = tmp_path / "lamp.blend"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "image_to_blend.py"), str(image), "-o", str(out),
                          "--server", fake_server.address, "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"wrote {out} (lamp: 18 faces)" in run.stdout
    submit = next(m for m in fake_server.received if type(m).__name__ == "Generate")
    assert submit.settings["seed"] == 3
    bpy.ops.wm.open_mainfile(filepath=str(out))
    lamp = bpy.data.objects["lamp"]
    assert len(lamp.data.polygons) == 18 and lamp.data.materials[0].node_tree.nodes["Principled BSDF"]


def test_image_to_blend_reports_a_failure_in_one_line(tmp_path) -> None:
    image = tmp_path / "lamp.png"
    image.write_bytes(synthetic.subject_png(32))
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "image_to_blend.py"), str(image),
                          "--backend-python", str(tmp_path / "no-python")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("TRELLIS.2: The backend Python ")
    assert "Traceback" not in run.stderr and not (tmp_path / "lamp.blend").exists()
