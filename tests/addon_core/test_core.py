"""The Blender-free core of the add-on, imported from the source tree (no zip, no bpy): settings, result checking
and conversion, errors, and jobs against a fake backend (tests/protocol/protocol_fakes.py) on loopback."""

from __future__ import annotations

import time

import numpy as np
import pytest
from addon_fakes import backend_handler
from protocol_fakes import FakeServer, png_bytes

import protocol as wire
import synthetic
from blender_addon.core import errors, result, settings
from blender_addon.core.connection import DEAD_AFTER_S, Connection
from blender_addon.core.remote_job import RemoteJob
from protocol.client import LOST, RESTARTED
from protocol.settings import GENERATE, REPROCESS, Schema, Setting

# -- settings ----------------------------------------------------------------------------------------


def test_the_add_on_speaks_the_repositorys_protocol_from_the_source_tree() -> None:
    import blender_addon.protocol

    assert blender_addon.protocol is wire and errors.ProtocolError is wire.ProtocolError


def test_settings_resolve_over_a_base_and_become_a_requests_flat_map() -> None:
    base = {**settings.defaults(), "seed": 9, "faces": 200_000}
    resolved = settings.resolve({"texture_size": 1024, "alpha_mode": "BLEND"}, base)
    sent = settings.request_settings(resolved, GENERATE)
    assert sent == {"pipeline_type": "1024_cascade", "seed": 9, "remove_background": True, "faces": 200_000,
                    "texture_size": 1024, "remesh": False, "alpha_mode": "BLEND", "alpha_cutoff": 0.5}
    wire.SETTINGS.check(GENERATE, sent)  # what the add-on sends is what the backend accepts
    advanced = settings.request_settings(settings.resolve({"use_advanced": True, "shape_steps": 20}), GENERATE,
                                         {"detail": 0.3})
    assert advanced["shape_steps"] == 20 and advanced["max_num_tokens"] == 49152 and advanced["detail"] == 0.3
    assert settings.request_settings(resolved, REPROCESS) == {k: sent[k] for k in (
        "faces", "texture_size", "remesh", "alpha_mode", "alpha_cutoff")}


@pytest.mark.parametrize("values, complaint", [
    ({"colour": 1}, "unknown setting(s) colour"),
    ({"faces": 10}, "an integer in [1000, 20000000]"),
    ({"seed": 1.5}, "setting seed must be int"),
    ({"alpha_mode": "SOMETIMES"}, "one of AUTO, OPAQUE, MASK, BLEND"),
    ({"remesh": 1}, "setting remesh must be bool"),
])
def test_bad_settings_are_refused_with_a_hint(values, complaint: str) -> None:
    with pytest.raises(wire.InvalidSettings) as info:
        settings.resolve(values)
    assert complaint.lower() in str(errors.user_error(info.value)).lower()


def test_int_choices_become_string_enums_for_blender_and_back() -> None:
    size = settings.FIELDS["texture_size"]
    assert settings.to_blender(size, 2048) == "2048" and settings.from_blender(size, "512") == 512
    faces = settings.FIELDS["faces"]
    assert settings.to_blender(faces, 7000) == 7000


def test_settings_of_a_newer_server_are_found() -> None:
    extra = Setting("detail", "float", 0.5, "Detail", "How much", (GENERATE,), "advanced", "shape", 0.0, 1.0)
    newer = Schema((*wire.SETTINGS.settings, extra))
    assert settings.unknown_settings(Schema.from_wire(newer.to_wire()), GENERATE) == [extra]
    assert settings.unknown_settings(wire.SETTINGS, GENERATE) == []


# -- results -----------------------------------------------------------------------------------------


def test_a_result_becomes_per_corner_uvs_and_bottom_up_float_pixels() -> None:
    mesh, textures = synthetic.plane_arrays(n=4, texture=8)
    data = result.mesh_data(mesh, textures, synthetic.metadata("MASK", double_sided=False))
    assert data.positions.dtype == np.float32 and data.corner_verts.dtype == np.int32
    assert data.face_count == 18 and np.array_equal(data.corner_verts, mesh["indices"].reshape(-1))
    assert np.array_equal(data.corner_uvs, mesh["uvs"][mesh["indices"].reshape(-1)])
    pixels = data.material.base_color.pixels.reshape(8, 8, 4)
    assert np.allclose(pixels[0, 0, :3], np.array(synthetic.BLUE) / 255)  # Blender's row 0 is the bottom (v = 0)
    assert np.allclose(pixels[-1, 0, :3], np.array(synthetic.RED) / 255)
    mr = data.material.metallic_roughness.pixels.reshape(8, 8, 4)
    assert np.allclose(mr[..., 3], 1.0) and np.allclose(mr[0, 0, 1:3], [128 / 255, 1.0])
    assert (data.material.alpha_mode, data.material.alpha_cutoff, data.material.double_sided) == ("MASK", 0.5, False)


def test_degenerate_triangles_are_dropped() -> None:
    mesh, textures = synthetic.plane_arrays(n=3, texture=4)
    mesh["indices"] = np.concatenate([mesh["indices"], np.array([[0, 0, 1], [2, 3, 2]], np.uint32)])
    assert result.mesh_data(mesh, textures, {}).face_count == 8


def _broken(kind: str):
    mesh, textures = synthetic.plane_arrays(n=3, texture=4)
    metadata = synthetic.metadata()
    if kind == "missing":
        del mesh["normals"]
    elif kind == "shape":
        mesh["uvs"] = mesh["uvs"][:, :1]
    elif kind == "range":
        mesh["indices"] = mesh["indices"] + 100
    elif kind == "nan":
        mesh["positions"][0, 0] = np.nan
    elif kind == "texture":
        textures["base_color"] = textures["base_color"].astype(np.float32)
    elif kind == "alpha":
        metadata["alpha_mode"] = "SOMETIMES"
    elif kind == "empty":
        mesh["indices"] = np.zeros((0, 3), np.uint32)
    return mesh, textures, metadata


@pytest.mark.parametrize("kind, complaint", [
    ("missing", "no mesh array 'normals'"), ("shape", "'uvs' is float32[9, 1]"), ("range", "outside its 9 vertices"),
    ("nan", "NaN"), ("texture", "'base_color' is float32"), ("alpha", "alpha_mode='SOMETIMES'"),
    ("empty", "empty mesh"),
])
def test_a_result_that_breaks_the_contract_is_refused_before_blender_sees_it(kind: str, complaint: str) -> None:
    with pytest.raises(errors.AddonError) as info:
        result.mesh_data(*_broken(kind))
    assert complaint in info.value.message and info.value.hint


# -- errors ------------------------------------------------------------------------------------------


def test_errors_become_one_line_with_a_hint() -> None:
    remote = errors.user_error(wire.RemoteError(wire.ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory",
                                                "pick the 512 pipeline"))
    assert str(remote) == "The GPU ran out of memory [out_of_memory]. pick the 512 pipeline"
    lost = errors.user_error(wire.BackendUnreachable("no message for 3.0 s"))
    assert "Preferences > Add-ons > TRELLIS.2" in lost.hint
    unexpected = errors.user_error(ZeroDivisionError("division by zero"))
    assert str(unexpected).startswith("Unexpected error: ZeroDivisionError: division by zero.")
    assert "\n" not in str(unexpected)


# -- jobs against a fake backend -----------------------------------------------------------------------


@pytest.fixture
def server():
    servers: list[FakeServer] = []

    def make(handler) -> FakeServer:
        servers.append(FakeServer(handler))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def make_job(address: str, resume_for: float = 1.0, **kwargs) -> RemoteJob:
    connection = Connection(address, resume_for=resume_for)
    request = {"request": wire.Generate(png_bytes(4, 4), {"seed": 1})} | kwargs
    return RemoteJob("plane", lambda say: connection.client(), **request)


def wait(job, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not job.done and time.monotonic() < deadline:
        job.drain()
        time.sleep(0.02)


def test_a_threaded_job_reports_progress_and_delivers_the_converted_result(server) -> None:
    fake = server(backend_handler())
    seen: list[tuple[str, int]] = []
    job = make_job(fake.address, on_event=lambda j: seen.append((j.status.stage, j.status.step)))
    job.start()
    wait(job)
    assert job.state == "done" and job.job_id == "job-1" and job.outcome.face_count == 18
    assert [s for s in seen if s[0] == "shape"] == [("shape", 1), ("shape", 2), ("shape", 3)]
    submitted = next(m for m in fake.received if isinstance(m, wire.Generate))
    assert submitted.settings == {"seed": 1}


def test_cancel_reaches_the_server_and_ends_the_job_cancelled(server) -> None:
    fake = server(backend_handler(finish=False))
    job = make_job(fake.address)
    job.start()
    deadline = time.monotonic() + 10
    while job.job_id is None and time.monotonic() < deadline:
        job.drain()
        time.sleep(0.02)
    job.cancel()
    wait(job)
    assert job.state == "cancelled"
    assert [m.job_id for m in fake.received if isinstance(m, wire.Cancel)] == ["job-1"]


def test_a_lost_backend_is_reported_within_seconds_and_fails_after_the_resume_window(server) -> None:
    fake = server(backend_handler(finish=False))
    seen: list[str] = []
    job = make_job(fake.address, resume_for=1.0, on_event=lambda j: seen.append(j.status.message))
    job.start()
    while job.job_id is None:
        job.drain()
        time.sleep(0.02)
    fake.mute = True  # the backend hangs: no more pongs
    started = time.monotonic()
    wait(job)
    assert LOST in seen, "the progress line says the backend is lost while the client reconnects"
    assert job.state == "failed" and job.error.message.endswith("[backend_unreachable]")
    assert time.monotonic() - started < DEAD_AFTER_S + 1.0 + 2


def test_a_job_follows_its_backend_through_a_restart(server) -> None:
    fake = server(backend_handler(finish=False))
    seen: list[str] = []
    job = make_job(fake.address, on_event=lambda j: seen.append(j.status.message))
    job.start()
    deadline = time.monotonic() + 10
    while job.status.stage != "shape" and time.monotonic() < deadline:
        job.drain()
        time.sleep(0.02)
    fake.handler = backend_handler()  # the restarted backend has finished the job: fetch returns its result
    fake.restart()
    wait(job)
    assert RESTARTED in seen and job.state == "done" and job.outcome.face_count == 18
    assert [m.job_id for m in fake.received if isinstance(m, wire.Fetch)] == ["job-1"]


def test_a_server_error_fails_the_job_with_the_servers_hint(server) -> None:
    def refuse(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Generate):
            return [wire.Error(wire.ErrorCode.INVALID_SETTINGS, "seed must be an integer", "pass an int",
                               client_job_id=msg.client_job_id)]
        return backend_handler()(msg)

    job = make_job(server(refuse).address)
    job.run_here()
    assert job.state == "failed" and str(job.error) == "Seed must be an integer [invalid_settings]. pass an int"


def test_a_backend_of_another_protocol_version_is_named_as_such(server) -> None:
    def other_version(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Hello):
            return [wire.Error.from_exception(wire.ProtocolVersionError(1, 2))]
        return []

    job = make_job(server(other_version).address)
    job.run_here()
    assert job.error.message.endswith("[version_mismatch]")
    assert job.error.hint == "Install the add-on and the backend from the same release."


def test_a_fetch_job_collects_a_stored_result_on_the_calling_thread(server) -> None:
    fake = server(backend_handler())
    job = make_job(fake.address, request=None, fetch_job_id="job-7")
    job.run_here()
    assert job.state == "done" and job.job_id == "job-7" and job.outcome.face_count == 18
    assert any(isinstance(m, wire.Fetch) and m.job_id == "job-7" for m in fake.received)


def test_the_status_line_shows_the_queue_and_how_many_workers_serve():
    from blender_addon.core.status import BackendStatus

    workers = [wire.WorkerStatus("gpu0", "box", "cuda", wire.WorkerState.BUSY, ["job-1"]),
               wire.WorkerStatus("gpu1", "box", "cuda", wire.WorkerState.IDLE)]
    info = wire.Info("s", "1", "m", wire.ModelStatus.READY, "2 workers: cuda", 3, "i", workers=workers)
    text = BackendStatus.from_info(info).text
    assert "3 job(s)" in text and "2 workers (1 busy)" in text

