"""The Blender-free core of the installed extension: settings, result checking and conversion, errors, and jobs
against a fake backend (tests/protocol/protocol_fakes.py) on loopback."""

from __future__ import annotations

import time

import numpy as np
import pytest
from protocol_fakes import FakeServer, info_for, png_bytes

import protocol as wire  # the repository's protocol, for the fake server's side
import synthetic
from conftest import addon_module


@pytest.fixture(scope="module")
def core(addon):
    return {name: addon_module(f"core.{name}") for name in ("settings", "result", "errors", "jobs", "backend")}


# -- settings ----------------------------------------------------------------------------------------


def test_settings_resolve_over_a_base_and_travel_in_the_servers_schema(core) -> None:
    s = core["settings"]
    base = {**s.defaults(), "seed": 9, "faces": 200_000}
    settings = s.resolve({"texture_size": "1024", "alpha_mode": "BLEND"}, base)
    wire_settings = s.to_wire(settings)
    assert wire_settings == {
        "pipeline_type": "1024_cascade", "seed": 9, "preprocess": True, "max_num_tokens": 49152,
        "asset": {"faces": 200_000, "texture_size": 1024, "remesh": False, "alpha_mode": "BLEND", "alpha_cutoff": 0.5},
    }
    custom = s.to_wire(s.resolve({"custom_sampling": True, "shape_steps": 20}))
    assert custom["shape_sampler"] == {"steps": 20, "guidance_strength": 7.5, "guidance_rescale": 0.5, "rescale_t": 3.0}
    assert set(custom) >= {"sparse_structure_sampler", "texture_sampler"}
    assert s.reprocess_wire("job1", settings) == {"reprocess_job": "job1", "asset": wire_settings["asset"]}


@pytest.mark.parametrize("values, complaint", [
    ({"colour": 1}, "Unknown setting(s) colour"),
    ({"faces": 10}, "Use a value in [1000, 2e+07]"),
    ({"seed": 1.5}, "must be int"),
    ({"alpha_mode": "SOMETIMES"}, "Use one of AUTO, OPAQUE, MASK, BLEND"),
    ({"remesh": 1}, "must be bool"),
])
def test_bad_settings_are_refused_with_a_hint(core, values, complaint: str) -> None:
    with pytest.raises(core["errors"].AddonError) as info:
        core["settings"].resolve(values)
    assert complaint in str(info.value)


# -- results -----------------------------------------------------------------------------------------


def test_a_result_becomes_per_corner_uvs_and_bottom_up_float_pixels(core) -> None:
    mesh, textures = synthetic.plane_arrays(n=4, texture=8)
    data = core["result"].mesh_data(mesh, textures, synthetic.metadata("MASK", double_sided=False))
    assert data.positions.dtype == np.float32 and data.corner_verts.dtype == np.int32
    assert data.face_count == 18 and np.array_equal(data.corner_verts, mesh["indices"].reshape(-1))
    assert np.array_equal(data.corner_uvs, mesh["uvs"][mesh["indices"].reshape(-1)])
    pixels = data.base_color.pixels.reshape(8, 8, 4)
    assert np.allclose(pixels[0, 0, :3], np.array(synthetic.BLUE) / 255)  # Blender's row 0 is the bottom (v = 0)
    assert np.allclose(pixels[-1, 0, :3], np.array(synthetic.RED) / 255)
    mr = data.metallic_roughness.pixels.reshape(8, 8, 4)
    assert np.allclose(mr[..., 3], 1.0) and np.allclose(mr[0, 0, 1:3], [128 / 255, 1.0])
    assert (data.alpha_mode, data.alpha_cutoff, data.double_sided) == ("MASK", 0.5, False)


def test_degenerate_triangles_are_dropped(core) -> None:
    mesh, textures = synthetic.plane_arrays(n=3, texture=4)
    mesh["indices"] = np.concatenate([mesh["indices"], np.array([[0, 0, 1], [2, 3, 2]], np.uint32)])
    assert core["result"].mesh_data(mesh, textures, {}).face_count == 8


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
def test_a_result_that_breaks_the_contract_is_refused_before_blender_sees_it(core, kind: str, complaint: str) -> None:
    with pytest.raises(core["errors"].AddonError) as info:
        core["result"].mesh_data(*_broken(kind))
    assert complaint in info.value.message and info.value.hint


# -- errors ------------------------------------------------------------------------------------------


def test_errors_become_one_line_with_a_hint(core) -> None:
    errors, protocol = core["errors"], addon_module("protocol")
    remote = errors.user_error(protocol.RemoteError(protocol.ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory",
                                                    "pick the 512 pipeline"))
    assert str(remote) == "The GPU ran out of memory [out_of_memory]. pick the 512 pipeline"
    lost = errors.user_error(protocol.BackendUnreachable("no message for 3.0 s"))
    assert "Preferences > Add-ons > TRELLIS.2" in lost.hint
    unexpected = errors.user_error(ZeroDivisionError("division by zero"))
    assert str(unexpected).startswith("Unexpected error: ZeroDivisionError: division by zero.")
    assert "\n" not in str(unexpected)


# -- jobs against a fake backend -----------------------------------------------------------------------


def backend_handler(events_per_job: int = 3, finish: bool = True):
    """A fake backend: accepts, reports progress, then (if `finish`) sends the synthetic plane as the result."""
    mesh, textures = synthetic.plane_arrays(n=4, texture=8)

    def handle(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Hello):
            return [info_for()]
        if isinstance(msg, wire.Submit):
            replies = [wire.Accepted("job-1", 0, msg.client_job_id)]
            replies += [wire.Progress("job-1", "shape", i, events_per_job, i / (events_per_job + 1))
                        for i in range(1, events_per_job + 1)]
            if finish:
                replies.append(wire.Result("job-1", mesh, textures, synthetic.metadata()))
            return replies
        if isinstance(msg, wire.Cancel):
            return [wire.Cancelled(msg.job_id)]
        if isinstance(msg, wire.Fetch):
            return [wire.Result(msg.job_id, mesh, textures, synthetic.metadata())]
        return []

    return handle


@pytest.fixture
def server():
    servers: list[FakeServer] = []

    def make(handler) -> FakeServer:
        servers.append(FakeServer(handler))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def make_job(core, address: str, **kwargs):
    connection = core["backend"].Connection(address)
    request = {"image": png_bytes(4, 4), "settings": {"seed": 1}} | kwargs
    return core["jobs"].Job("plane", lambda say: connection.client(), **request)


def wait(job, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not job.done and time.monotonic() < deadline:
        job.drain()
        time.sleep(0.02)


def test_a_threaded_job_reports_progress_and_delivers_the_converted_result(core, server) -> None:
    fake = server(backend_handler())
    seen: list[tuple[str, int]] = []
    job = make_job(core, fake.address, on_event=lambda j: seen.append((j.status.stage, j.status.step)))
    job.start()
    wait(job)
    assert job.state == "done" and job.job_id == "job-1" and job.mesh.face_count == 18
    assert [s for s in seen if s[0] == "shape"] == [("shape", 1), ("shape", 2), ("shape", 3)]
    submitted = next(m for m in fake.received if isinstance(m, wire.Submit))
    assert submitted.settings == {"seed": 1}


def test_cancel_reaches_the_server_and_ends_the_job_cancelled(core, server) -> None:
    fake = server(backend_handler(finish=False))
    job = make_job(core, fake.address)
    job.start()
    deadline = time.monotonic() + 10
    while job.job_id is None and time.monotonic() < deadline:
        job.drain()
        time.sleep(0.02)
    job.cancel()
    wait(job)
    assert job.state == "cancelled"
    assert [m.job_id for m in fake.received if isinstance(m, wire.Cancel)] == ["job-1"]


def test_a_lost_backend_is_reported_within_seconds(core, server) -> None:
    fake = server(backend_handler(finish=False))
    job = make_job(core, fake.address)
    job.start()
    while job.job_id is None:
        job.drain()
        time.sleep(0.02)
    fake.mute = True  # the backend hangs: no more pongs
    started = time.monotonic()
    wait(job)
    assert job.state == "failed" and job.error.message.endswith("[backend_unreachable]")
    assert time.monotonic() - started < core["backend"].DEAD_AFTER_S + 2


def test_a_server_error_fails_the_job_with_the_servers_hint(core, server) -> None:
    def refuse(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Submit):
            return [wire.Error(wire.ErrorCode.INVALID_SETTINGS, "seed must be an integer", "pass an int",
                               client_job_id=msg.client_job_id)]
        return backend_handler()(msg)

    job = make_job(core, server(refuse).address)
    job.run_here()
    assert job.state == "failed" and str(job.error) == "Seed must be an integer [invalid_settings]. pass an int"


def test_a_backend_of_another_protocol_version_is_named_as_such(core, server) -> None:
    def other_version(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Hello):
            return [wire.Error.from_exception(wire.ProtocolVersionError(1, 2))]
        return []

    job = make_job(core, server(other_version).address)
    job.run_here()
    assert job.error.message.endswith("[version_mismatch]")
    assert job.error.hint == "Install the add-on and the backend from the same release."


def test_a_fetch_job_collects_a_stored_result_on_the_calling_thread(core, server) -> None:
    fake = server(backend_handler())
    job = make_job(core, fake.address, image=None, settings=None, fetch_job_id="job-7")
    job.run_here()
    assert job.state == "done" and job.job_id == "job-7" and job.mesh.face_count == 18
    assert any(isinstance(m, wire.Fetch) and m.job_id == "job-7" for m in fake.received)
