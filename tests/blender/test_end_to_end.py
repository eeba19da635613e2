"""End to end against a real backend process on loopback with the tiny checkpoint: the installed extension starts
`.venv/bin/python -m backend serve` itself (local mode), the operator runs synchronously as under `blender -b`, and
the object is checked, saved and reloaded; then re-process, re-import, cancel reaching the server mid-job, a dying
backend and missing weights; and Texture Selected on objects with and without UVs, once the backend offers it.
`./trellis2 generate`'s driver is run the same way. Skipped, with the reason, while the backend cannot serve. TRELLIS2_BACKEND_PYTHON points the tests at another backend environment (e.g. a conda one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest

import protocol as wire
import synthetic
from conftest import PACKAGE, ROOT, addon_module
from test_build import ALPHA_LINK, BASE_LINKS, links

BACKEND_PYTHON = Path(os.environ.get("TRELLIS2_BACKEND_PYTHON", ROOT / ".venv" / "bin" / "python"))
FAST = dict(pipeline_type="512", use_advanced=True, sparse_structure_steps=4, shape_steps=4, texture_steps=4,
            texture_size="512", faces=20_000)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BACKEND_PYTHON.is_file():
        pytest.skip(f"no backend environment at {BACKEND_PYTHON}: run tools/setup_envs.sh")
    probe = subprocess.run([str(BACKEND_PYTHON), "-m", "backend", "serve", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the backend server is not available: `python -m backend serve --help` fails: "
                    + (probe.stderr.strip().splitlines() or ["no output"])[-1])
    weights = tmp_path_factory.mktemp("tiny-weights")
    subprocess.run([str(BACKEND_PYTHON), "-m", "backend", "tiny-checkpoint", str(weights)], check=True,
                   capture_output=True)
    return weights


@pytest.fixture(scope="module")
def stop_at_end():
    """The local backend lives through this module's tests (its job store is in the test's Blender user folder)."""
    yield
    addon_module("blender.running").session.backend.stop()


@pytest.fixture
def local_backend(scene, tiny_weights: Path, stop_at_end):
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.backend_mode, prefs.backend_python, prefs.weights = "LOCAL", str(BACKEND_PYTHON), str(tiny_weights)
    return prefs


def subject(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.png"
    path.write_bytes(synthetic.subject_png())
    return str(path)


def check_generated(obj: bpy.types.Object, texture_size: int) -> None:
    me = obj.data
    assert len(me.polygons) > 0 and len(me.loops) == 3 * len(me.polygons)
    assert me.uv_layers.active.name == "UVMap" and me.has_custom_normals
    material = me.materials[0]
    alpha_input = material.node_tree.nodes["Principled BSDF"].inputs["Alpha"]
    assert links(material) >= BASE_LINKS and alpha_input.is_linked
    if material.surface_render_method == "BLENDED":  # the backend's AUTO alpha mode found transparency
        assert ALPHA_LINK in links(material)
    images = [n.image for n in material.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert all(i.packed_file is not None and tuple(i.size) == (texture_size, texture_size) for i in images)
    assert sorted(i.colorspace_settings.name for i in images) == ["Non-Color", "sRGB"]


def test_generate_reprocess_and_reimport_with_a_real_backend(local_backend, tmp_path: Path) -> None:
    scene = bpy.context.scene
    assert bpy.ops.trellis2.generate(image_path=subject(tmp_path, "vase"), seed=1, **FAST) == {"FINISHED"}
    vase = scene.objects["vase"]
    check_generated(vase, 512)
    job_id = vase["trellis2_job"]
    assert scene.trellis2.recent[0].job_id == job_id

    scene.trellis2.settings.texture_size = "256"
    assert bpy.ops.trellis2.reprocess(index=0) == {"FINISHED"}
    check_generated(scene.objects["vase.001"], 256)
    assert bpy.ops.trellis2.reimport(index=1) == {"FINISHED"}  # the first job, fetched from the job store
    assert len(scene.objects["vase.002"].data.polygons) == len(vase.data.polygons)

    path = tmp_path / "vase.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.open_mainfile(filepath=str(path))
    check_generated(bpy.data.objects["vase"], 512)


def start_slow_job(prefs, tmp_path: Path, name: str):
    """A job with many shape steps, started in a worker thread and followed until its shape stage runs."""
    running, settings = addon_module("blender.running"), addon_module("core.settings")
    chosen = settings.resolve({**FAST, "texture_size": 512, "shape_steps": 100, "texture_steps": 100})
    request = addon_module("protocol").Generate(Path(subject(tmp_path, name)).read_bytes(),
                                                settings.request_settings(chosen, "generate"))
    job = addon_module("core.remote_job").RemoteJob(
        name, running.session.connector(prefs.backend_plan(connecting=True)), request=request)
    job.start()
    deadline = time.monotonic() + 120
    while job.status.stage != "shape" and not job.done and time.monotonic() < deadline:
        job.drain()
        time.sleep(0.05)
    assert job.status.stage == "shape", job.error
    return job


def wait_done(job, seconds: float) -> float:
    started = time.monotonic()
    while not job.done and time.monotonic() - started < seconds:
        job.drain()
        time.sleep(0.05)
    return time.monotonic() - started


def test_cancel_stops_the_job_on_the_server(local_backend, tmp_path: Path) -> None:
    job = start_slow_job(local_backend, tmp_path, "slow")
    job.cancel()
    assert wait_done(job, 30) < 10 and job.state == "cancelled"


def test_a_dying_local_backend_is_reported_within_seconds_with_its_log(local_backend, tmp_path: Path) -> None:
    running = addon_module("blender.running")
    job = start_slow_job(local_backend, tmp_path, "doomed")
    running.session.backend._proc.kill()  # as the OOM killer would
    assert wait_done(job, 30) < addon_module("core.connection").DEAD_AFTER_S + 2 and job.state == "failed"
    with pytest.raises(addon_module("core.errors").AddonError) as info:
        running.complete(job, running.target_here(bpy.context, "doomed", {}))
    assert info.value.message == "The local backend stopped unexpectedly (exit code -9)"
    assert "backend.log ends with:" in info.value.hint and "job" in info.value.hint


def test_missing_weights_are_reported_with_the_backends_hint(local_backend, tmp_path: Path) -> None:
    local_backend.weights = str(tmp_path / "no-weights-here")
    with pytest.raises(RuntimeError) as info:
        bpy.ops.trellis2.generate(image_path=subject(tmp_path, "ghost"), **FAST)
    assert "no-weights-here" in str(info.value) and "[model_not_ready]" in str(info.value)
    assert "Traceback" not in str(info.value)


def require_texturing(prefs) -> None:
    """Skip unless the local backend runs texture requests: its info, once its models are loaded, lists "texture"
    among its capabilities."""
    session = addon_module("blender.running").session
    address = session.start_local(prefs.backend_plan(connecting=True), lambda text: None)
    deadline = time.monotonic() + 120
    with addon_module("core.connection").Connection.local(address).client() as client:
        info = client.hello()
        loading = (wire.ModelStatus.NOT_LOADED, wire.ModelStatus.LOADING)
        while info.model_status in loading and time.monotonic() < deadline:
            time.sleep(0.5)
            info = client.info(refresh=True)
    assert info.model_status == wire.ModelStatus.READY, info
    # The tiny checkpoint has a texturing_pipeline.json: a backend without texturing here is a regression.
    assert "texture" in info.capabilities, info


@pytest.mark.parametrize("with_uvs", [True, False])
def test_texture_selected_with_a_real_backend(local_backend, tmp_path: Path, with_uvs: bool) -> None:
    require_texturing(local_backend)
    bpy.ops.mesh.primitive_cube_add(size=1.0, calc_uvs=with_uvs)
    obj = bpy.context.view_layer.objects.active
    obj.modifiers.new("Subdivision", "SUBSURF").levels = 1
    co = np.empty(3 * len(obj.data.vertices), np.float32)
    obj.data.vertices.foreach_get("co", co)
    uvs = np.empty(2 * len(obj.data.loops), np.float32)
    if with_uvs:
        obj.data.uv_layers["UVMap"].uv.foreach_get("vector", uvs)
    assert bpy.ops.trellis2.texture(object_name=obj.name, image_path=subject(tmp_path, "look"), resolution="512",
                                    texture_size="256", use_advanced=True, texture_steps=2) == {"FINISHED"}
    after = np.empty_like(co)
    obj.data.vertices.foreach_get("co", after)
    assert np.array_equal(after, co) and [m.type for m in obj.modifiers] == ["SUBSURF"]
    uv_map = "UVMap" if with_uvs else "TRELLIS.2"
    assert [layer.name for layer in obj.data.uv_layers] == [uv_map]
    if with_uvs:
        kept = np.empty_like(uvs)
        obj.data.uv_layers["UVMap"].uv.foreach_get("vector", kept)
        assert np.array_equal(kept, uvs)
    material = obj.material_slots[0].material
    assert material.node_tree.nodes["Principled BSDF"].inputs["Alpha"].is_linked and links(material) >= BASE_LINKS
    images = [n.image for n in material.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert all(i.packed_file is not None and tuple(i.size) == (256, 256) for i in images) and len(images) == 2


def test_trellis2_generate_driver_with_a_local_backend(tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "cup.blend"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "image_to_blend.py"), subject(tmp_path, "cup"), "-o", str(out),
         "--backend-python", str(BACKEND_PYTHON), "--weights", str(tiny_weights), "--pipeline-type", "512",
         "--texture-size", "512"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    bpy.ops.wm.open_mainfile(filepath=str(out))
    check_generated(bpy.data.objects["cup"], 512)
