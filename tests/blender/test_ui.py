"""Panel and preferences drawing, operators (errors become reports, never tracebacks), the UI's background path
(worker thread + the timer callback, pumped by hand since timers never fire in bpy-as-a-module), re-import and
re-process, all against a fake backend on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from protocol_fakes import png_bytes

import protocol as wire
from conftest import addon_module


class FakeLayout:
    """Records the calls a draw function makes, nested layouts included, into one shared log."""

    def __init__(self, log: list | None = None) -> None:
        self.log = [] if log is None else log

    def __getattr__(self, method: str):
        def call(*args, **kwargs):
            self.log.append((method, args, kwargs))
            if method == "operator":
                op = SimpleNamespace(idname=args[0], image_path="", image_name="")
                self.log.append(("operator_props", (op,), {}))
                return op
            return FakeLayout(self.log)

        return call

    def calls(self, method: str) -> list[tuple]:
        return [(args, kwargs) for m, args, kwargs in self.log if m == method]

    def props(self) -> list[str]:
        return [args[1] for args, _ in self.calls("prop")]

    def operators(self) -> dict[str, SimpleNamespace]:
        return {args[0].idname: args[0] for args, _ in self.calls("operator_props")}


def draw(panel: str) -> FakeLayout:
    layout = FakeLayout()
    getattr(bpy.types, panel).draw(SimpleNamespace(layout=layout), bpy.context)
    return layout


def image_file(tmp_path: Path, name: str = "chair.png") -> str:
    path = tmp_path / name
    path.write_bytes(png_bytes(8, 8))
    return str(path)


# -- drawing -----------------------------------------------------------------------------------------


def test_the_idle_panel_shows_status_image_settings_and_a_generate_button_carrying_them(scene, tmp_path) -> None:
    state = scene.trellis2
    state.image_path, state.settings.seed, state.settings.faces = image_file(tmp_path), 77, 123_456
    layout = draw("TRELLIS2_PT_main")
    labels = [kwargs.get("text", "") for _, kwargs in layout.calls("label")]
    assert any("local backend not running" in text for text in labels)
    assert {"image_source", "image_path", "pipeline_type", "seed", "remove_background"} <= set(layout.props())
    ops = layout.operators()
    assert {"trellis2.randomize_seed", "trellis2.start_backend", "trellis2.generate"} <= set(ops)
    generate = ops["trellis2.generate"]
    assert (generate.seed, generate.faces, generate.image_path) == (77, 123_456, state.image_path)
    assert "trellis2.cancel" not in ops and not layout.calls("progress")


def test_an_image_already_in_blender_is_picked_with_a_preview(scene) -> None:
    state = scene.trellis2
    state.image_source, state.image = "IMAGE", bpy.data.images.new("photo.png", 8, 8)
    layout = draw("TRELLIS2_PT_main")
    (args, kwargs), = layout.calls("template_ID_preview")
    assert args[1] == "image" and kwargs["open"] == "image.open"
    generate = layout.operators()["trellis2.generate"]
    assert (generate.image_name, generate.image_path) == ("photo.png", "")


def test_a_running_job_shows_a_progress_bar_with_stage_and_step_and_cancel(scene, addon) -> None:
    remote_job = addon_module("core.remote_job")
    job = remote_job.RemoteJob("chair", lambda say: None, request=addon_module("protocol").Generate(png_bytes()))
    job.status = remote_job.JobStatus("shape", 5, 12, 0.4)
    addon_module("blender.running").session.job = job
    layout = draw("TRELLIS2_PT_main")
    (args, kwargs), = layout.calls("progress")
    assert kwargs["factor"] == 0.4 and kwargs["text"] == "chair: shape 5/12"
    assert "trellis2.cancel" in layout.operators() and "trellis2.generate" not in layout.operators()


def test_the_last_outcome_is_shown_as_message_and_hint(scene, addon) -> None:
    addon_module("blender.running").session.message = ("ERROR", "The GPU ran out of memory. Pick the 512 pipeline")
    labels = [(kw.get("text"), kw.get("icon")) for _, kw in draw("TRELLIS2_PT_main").calls("label")]
    assert ("The GPU ran out of memory", "ERROR") in labels and ("Pick the 512 pipeline", "BLANK1") in labels


def test_sub_panels_fold_asset_advanced_and_recent_results(scene) -> None:
    settings = scene.trellis2.settings
    assert "alpha_cutoff" not in draw("TRELLIS2_PT_asset").props()
    settings.alpha_mode = "MASK"
    assert draw("TRELLIS2_PT_asset").props() == ["faces", "texture_size", "remesh", "alpha_mode", "alpha_cutoff"]
    advanced = draw("TRELLIS2_PT_advanced")
    assert {"use_advanced", "shape_steps", "texture_guidance_strength", "texture_guidance_interval_end",
            "max_num_tokens", "fill_hole_perimeter"} <= set(advanced.props())
    assert "remesh_band" not in advanced.props()  # shown only with remesh on
    assert bpy.types.TRELLIS2_PT_advanced.bl_options == {"DEFAULT_CLOSED"}
    addon_module("blender.properties").remember(scene.trellis2, "chair", "job-1", {})
    recent = draw("TRELLIS2_PT_recent")
    assert recent.calls("template_list") and recent.operators()["trellis2.reprocess"].index == 0


def test_the_preferences_show_the_backend_choice_and_every_default_setting(prefs) -> None:
    fields = addon_module("core.settings").FIELDS
    layout = FakeLayout()
    type(prefs).draw(SimpleNamespace(layout=layout, backend_mode="LOCAL", defaults=prefs.defaults), bpy.context)
    assert {"backend_python", "weights"} <= set(layout.props())
    assert set(layout.props()) >= set(fields) - {"alpha_cutoff", "remesh_band"}
    assert "resolution" in layout.props()  # texturing's own default (the others are generation's too)
    remote = FakeLayout()
    type(prefs).draw(SimpleNamespace(layout=remote, backend_mode="REMOTE", defaults=prefs.defaults), bpy.context)
    assert {"server_address", "server_key", "client_key_file"} <= set(remote.props())


# -- operators: failures are reports ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, complaint", [
    ({"image_path": "/nonexistent/chair.png"}, "Cannot read the image /nonexistent/chair.png"),
    ({}, "Give an image file or a Blender image, exactly one of them"),
    ({"image_name": "no such image"}, "There is no Blender image named 'no such image'"),
])
def test_bad_requests_are_reported_not_raised_as_tracebacks(scene, kwargs, complaint: str) -> None:
    with pytest.raises(RuntimeError, match="Error: TRELLIS.2: " + complaint):  # how bpy.ops surfaces ERROR reports
        bpy.ops.trellis2.generate(**kwargs)


def test_a_file_that_is_not_an_image_is_refused_with_the_protocols_hint(scene, tmp_path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(RuntimeError, match=r"\[invalid_image\]\. Send a PNG, JPEG"):
        bpy.ops.trellis2.generate(image_path=str(tmp_path / "notes.png"))


def test_a_local_backend_without_python_says_where_to_set_it(prefs, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="No backend Python is set. Set Preferences > Add-ons > TRELLIS.2"):
        bpy.ops.trellis2.generate(image_path=image_file(tmp_path))


def test_an_unreachable_server_is_reported_within_seconds(prefs, tmp_path) -> None:
    port = addon_module("core.local_backend").free_loopback_port()
    prefs.backend_mode, prefs.server_address = "REMOTE", f"tcp://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"\[backend_unreachable\]\. Start the backend or check the address"):
        bpy.ops.trellis2.generate(image_path=image_file(tmp_path))
    assert time.monotonic() - started < addon_module("core.connection").DEAD_AFTER_S + 2


def test_a_remote_server_beyond_this_machine_needs_online_access(prefs, tmp_path) -> None:
    assert not bpy.app.online_access  # bpy-as-a-module starts offline, like Blender without "Allow Online Access"
    prefs.backend_mode, prefs.server_address = "REMOTE", "tcp://192.0.2.1:5555"
    with pytest.raises(RuntimeError, match="Online access is disabled.*Allow Online Access"):
        bpy.ops.trellis2.generate(image_path=image_file(tmp_path))


# -- operators against the fake backend --------------------------------------------------------------------


def test_generate_from_a_blender_image_builds_the_object_and_remembers_it(scene, fake_backend, capsys) -> None:
    image = bpy.data.images.new("photo.png", 8, 8)  # generated, never saved: sent as a PNG made on the fly
    assert bpy.ops.trellis2.generate(image_name=image.name, seed=5) == {"FINISHED"}
    obj = bpy.context.view_layer.objects.active
    assert obj.name == "photo" and obj["trellis2_job"] == "job-1" and len(obj.data.polygons) == 18
    submit = next(m for m in fake_backend.received if isinstance(m, wire.Generate))
    assert wire.image_info(submit.image).format == "png" and submit.settings["seed"] == 5
    assert submit.settings["faces"] == 500_000  # unset settings: the preferences' defaults
    assert "shape_steps" not in submit.settings  # advanced settings stay the backend's unless asked for
    assert image.source == "GENERATED"  # the user's image was not turned into a file image
    recent = scene.trellis2.recent[0]
    assert (recent.name, recent.job_id, recent.settings["seed"]) == ("photo", "job-1", 5)
    assert "TRELLIS.2 photo: shape 3/3" in capsys.readouterr().out  # batch progress lines


def test_reimport_and_reprocess_rebuild_a_recent_result(scene, fake_backend, tmp_path) -> None:
    bpy.ops.trellis2.generate(image_path=image_file(tmp_path))
    scene.trellis2.settings.texture_size = "512"
    assert bpy.ops.trellis2.reprocess(index=0) == {"FINISHED"}
    reprocess = [m for m in fake_backend.received if isinstance(m, wire.Reprocess)][-1]
    assert reprocess.source_job_id == "job-1" and reprocess.settings["texture_size"] == 512
    assert set(reprocess.settings) == {"faces", "texture_size", "remesh", "alpha_mode", "alpha_cutoff"}
    assert not any(isinstance(m, wire.Generate) and m.image == b"" for m in fake_backend.received)
    assert bpy.ops.trellis2.reimport(index=1) == {"FINISHED"}
    assert [m.job_id for m in fake_backend.received if isinstance(m, wire.Fetch)] == ["job-1"]
    assert sorted(o.name for o in scene.objects) == ["chair", "chair.001", "chair.002"]
    assert len(scene.trellis2.recent) == 2  # the re-processed result is remembered, the re-import is not


def test_the_ui_path_runs_the_job_in_a_thread_and_the_timer_builds_the_object(scene, prefs, fake_backend,
                                                                            caplog) -> None:
    running, timer = addon_module("blender.running"), addon_module("blender.timer")
    session = running.session
    scene.cursor.location = (0, 0, 2)
    job = addon_module("core.remote_job").RemoteJob("mug", session.connector(prefs.backend_plan(connecting=True)),
                                                    request=addon_module("protocol").Generate(png_bytes()))
    session.job, session.target = job, running.target_here(bpy.context, "mug", {"seed": 3})
    job.start()
    deadline = time.monotonic() + 10
    while session.job is not None and time.monotonic() < deadline:
        assert timer.tick() in (timer.TICK_BUSY_S, timer.TICK_IDLE_S)
        time.sleep(0.02)
    obj = scene.objects["mug"]
    assert tuple(obj.location) == (0, 0, 2) and obj.select_get()
    assert session.message == ("INFO", "built mug (18 faces)")
    assert scene.trellis2.recent[0].job_id == "job-1"
    while session.status(prefs.backend_plan()).state != "connected" and time.monotonic() < deadline:
        timer.tick()  # the timer started the status thread and tells it where to ask
        time.sleep(0.02)
    assert session.status(prefs.backend_plan()).text == "model ready · cpu"
    assert not [r for r in caplog.records if "timer" in r.getMessage()]


def test_randomise_seed_and_load_defaults(scene, prefs) -> None:
    settings = scene.trellis2.settings
    seeds = set()
    for _ in range(3):
        bpy.ops.trellis2.randomize_seed()
        seeds.add(settings.seed)
    assert len(seeds) > 1
    prefs.defaults.faces, prefs.defaults.pipeline_type = 250_000, "512"
    bpy.ops.trellis2.load_defaults()
    assert (settings.faces, settings.pipeline_type, scene.trellis2.defaults_loaded) == (250_000, "512", True)
    prefs.defaults.property_unset("faces")
    prefs.defaults.property_unset("pipeline_type")


def test_generate_is_blocked_while_a_job_runs(scene, addon) -> None:
    addon_module("blender.running").session.job = addon_module("core.remote_job").RemoteJob(
        "x", lambda say: None, request=addon_module("protocol").Generate(png_bytes()))
    assert not bpy.ops.trellis2.generate.poll()
    assert bpy.ops.trellis2.cancel.poll()
