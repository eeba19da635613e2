"""The scripts users run: the documented batch examples (examples/batch_folder.py and batch_texture.py, run as
`blender -b --python` would run them) and `./trellis2 generate`'s driver (tools/image_to_blend.py, as a
subprocess), against a fake backend."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time

import bpy
import numpy as np
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


BOX_OBJ = """# a unit cube with its own UVs
v -0.5 -0.5 -0.5
v 0.5 -0.5 -0.5
v 0.5 0.5 -0.5
v -0.5 0.5 -0.5
v -0.5 -0.5 0.5
v 0.5 -0.5 0.5
v 0.5 0.5 0.5
v -0.5 0.5 0.5
vt 0.1 0.1
vt 0.4 0.1
vt 0.4 0.4
vt 0.1 0.4
f 1/1 4/2 3/3 2/4
f 5/1 6/2 7/3 8/4
f 1/1 2/2 6/3 5/4
f 2/1 3/2 7/3 6/4
f 3/1 4/2 8/3 7/4
f 4/1 1/2 5/3 8/4
"""
WEDGE_PLY = """ply
format ascii 1.0
element vertex 6
property float x
property float y
property float z
element face 5
property list uchar int vertex_indices
end_header
0 0 0
1 0 0
0 1 0
0 0 1
1 0 1
0 1 1
3 0 2 1
3 3 4 5
4 0 1 4 3
4 1 2 5 4
4 2 0 3 5
"""


def imported_positions(path) -> np.ndarray:
    """The vertex positions Blender's importer makes of a mesh file, in a scene of their own."""
    bpy.ops.wm.read_homefile(use_empty=True)
    getattr(bpy.ops.wm, f"{path.suffix[1:]}_import")(filepath=str(path))
    mesh = bpy.context.selected_objects[0].data
    co = np.empty(3 * len(mesh.vertices), np.float32)
    mesh.vertices.foreach_get("co", co)
    return co


def test_the_batch_texture_example_textures_a_folder_of_meshes_into_one_blend(scene, fake_backend, tmp_path,
                                                                             capsys, monkeypatch) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a_box.obj").write_text(BOX_OBJ)
    (folder / "a_box.png").write_bytes(synthetic.subject_png(32))
    (folder / "b_wedge.ply").write_text(WEDGE_PLY)
    (folder / "b_wedge.PNG").write_bytes(synthetic.subject_png(32))
    (folder / "c_lonely.ply").write_text(WEDGE_PLY)  # no image of its name: reported, skipped
    (folder / "notes.txt").write_text("neither a mesh nor an image")
    out = tmp_path / "out" / "textured.blend"
    monkeypatch.setattr(sys, "argv", ["blender", "-b", "--python", "batch_texture.py", "--", str(folder), "-o",
                                      str(out), "--glb-dir", str(tmp_path / "glb"), "--server", fake_backend.address,
                                      "--texture-size", "256", "--seed", "4"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / "batch_texture.py"), run_name="__main__")
    assert exit_info.value.code == 1  # c_lonely failed
    printed = capsys.readouterr().out
    assert "[1/3] a_box.obj + a_box.png" in printed and "TRELLIS.2 a_box: texture 3/3" in printed
    assert "[3/3] c_lonely.ply\n  failed: no image named c_lonely" in printed
    assert f"wrote {out}: 2 of 3 meshes textured; failed: c_lonely.ply" in printed
    assert sorted(p.name for p in (tmp_path / "glb").iterdir()) == ["a_box.glb", "b_wedge.glb"]
    textures = [m for m in fake_backend.received if type(m).__name__ == "Texture"]
    assert [(m.settings["texture_size"], m.settings["seed"]) for m in textures] == [(256, 4), (256, 4)]

    bpy.ops.wm.open_mainfile(filepath=str(out))
    box, wedge = bpy.data.objects["a_box"], bpy.data.objects["b_wedge"]
    assert [layer.name for layer in box.data.uv_layers] == ["UVMap"]  # the file's own UVs, kept
    assert [layer.name for layer in wedge.data.uv_layers] == ["TRELLIS.2"]  # none in the file: one was made
    for obj in (box, wedge):
        material = obj.material_slots[0].material
        assert material.name == f"{obj.name} TRELLIS.2" and material.node_tree.nodes["Principled BSDF"]
    box_co, wedge_co = np.empty(24, np.float32), np.empty(18, np.float32)
    box.data.vertices.foreach_get("co", box_co)
    wedge.data.vertices.foreach_get("co", wedge_co)
    assert np.array_equal(box_co, imported_positions(folder / "a_box.obj"))  # as imported, bit for bit
    assert np.array_equal(wedge_co, imported_positions(folder / "b_wedge.ply"))


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


def test_the_readme_command_without_weights_fails_within_seconds_with_one_message(tmp_path) -> None:
    backend_python = ROOT / ".venv" / "bin" / "python"
    if not backend_python.is_file():
        pytest.skip(f"no backend environment at {backend_python}: run tools/setup_envs.sh")
    image = tmp_path / "lamp.png"
    image.write_bytes(synthetic.subject_png(32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "image_to_blend.py"), str(image), "--backend-python",
                          str(backend_python)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1 and time.monotonic() - started < 15
    assert run.stderr.count("error:") == 1 and "weights download" in run.stderr
    assert "server log" not in run.stderr and "Traceback" not in run.stderr
