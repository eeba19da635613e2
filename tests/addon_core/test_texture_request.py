"""Texture Selected's Blender-free half: the request made of an object's mesh arrays, the rule for usable UVs (and
that it agrees with the backend's), the texture result's checks, and a texture job against the fake backend."""

from __future__ import annotations

import numpy as np
import pytest
from addon_fakes import TEXTURE_METADATA, backend_handler, texture_result
from protocol_fakes import FakeServer, png_bytes

import protocol as wire
import synthetic
from blender_addon.core import settings, texturing
from blender_addon.core.connection import Connection
from blender_addon.core.errors import AddonError
from blender_addon.core.remote_job import RemoteJob
from blender_addon.core.result import SurfaceTextures, surface_textures
from protocol.settings import TEXTURE


def plane(n: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, triangles, per-corner UVs) of synthetic.py's plane, as the add-on reads them from Blender."""
    mesh, _ = synthetic.plane_arrays(n=n, texture=4)
    triangles = mesh["indices"].astype(np.int32)
    return mesh["positions"], triangles, mesh["uvs"][triangles.reshape(-1)]


# -- the request -------------------------------------------------------------------------------------


def test_a_texture_request_carries_the_contracts_arrays_and_the_texture_settings() -> None:
    positions, triangles, uvs = plane()
    chosen = settings.resolve({"resolution": 512, "seed": 3, "texture_size": 1024, "faces": 2000})
    request = texturing.texture_request(png_bytes(), positions, triangles, uvs,
                                        settings.request_settings(chosen, TEXTURE))
    mesh = request.mesh
    assert (mesh["positions"].dtype, mesh["indices"].dtype, mesh["uvs"].dtype) == (np.float32, np.uint32, np.float32)
    assert mesh["positions"].shape == (16, 3) and mesh["indices"].shape == (18, 3) and mesh["uvs"].shape == (54, 2)
    assert np.array_equal(mesh["indices"], triangles) and np.array_equal(mesh["uvs"], uvs)
    assert request.settings == {"resolution": 512, "seed": 3, "remove_background": True, "texture_size": 1024,
                                "alpha_mode": "AUTO", "alpha_cutoff": 0.5}  # no faces: generate's, not texture's
    wire.SETTINGS.check(TEXTURE, request.settings)  # what the add-on sends is what the backend accepts
    decoded = wire.decode(wire.encode(request))
    assert np.array_equal(decoded.mesh["uvs"], uvs) and decoded.settings == request.settings


def test_advanced_texture_settings_are_sent_only_when_asked_for() -> None:
    advanced = settings.request_settings(settings.resolve({"use_advanced": True, "texture_steps": 20}), TEXTURE)
    assert advanced["texture_steps"] == 20 and "shape_steps" not in advanced and "max_num_tokens" not in advanced
    assert set(settings.request_fields(TEXTURE)) == {*advanced, "use_advanced"}


def test_uvs_that_are_not_one_per_corner_are_a_programming_error() -> None:
    positions, triangles, uvs = plane()
    with pytest.raises(ValueError, match="one per corner"):
        texturing.texture_request(png_bytes(), positions, triangles, uvs[:-3], {})


def no_faces(positions: np.ndarray, triangles: np.ndarray):
    return positions, triangles[:0]


def a_nan(positions: np.ndarray, triangles: np.ndarray):
    positions = positions.copy()
    positions[2, 1] = np.nan
    return positions, triangles


def all_on_a_line(positions: np.ndarray, triangles: np.ndarray):
    return np.repeat(positions[:, :1], 3, axis=1), triangles


@pytest.mark.parametrize("break_it, complaint", [
    (no_faces, "chair has no faces (after its modifiers)"),
    (a_nan, "chair has vertex positions that are NaN or infinite"),
    (all_on_a_line, "Every face of chair has zero area"),
])
def test_meshes_that_cannot_be_textured_are_named_with_a_hint(break_it, complaint: str) -> None:
    positions, triangles, _ = plane()
    with pytest.raises(AddonError) as info:
        texturing.check_surface("chair", *break_it(positions, triangles))
    assert complaint in info.value.message and info.value.hint


# -- the UV rule -------------------------------------------------------------------------------------


def uv_cases() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    positions, triangles, uvs = plane(n=6)
    collapsed_few, collapsed_many = uvs.copy(), uvs.copy()
    collapsed_few[:3] = collapsed_few[0]  # one of 50 triangles: 2% of the surface
    collapsed_many[: 3 * 10] = 0.25  # 10 of 50 triangles: 20%
    noisy = np.clip(uvs, 0, 1) + np.float32(5e-7)
    return {
        "good": (positions, triangles, uvs),
        "a few collapsed": (positions, triangles, collapsed_few),
        "exporter noise": (positions, triangles, noisy),
        "tiled": (positions, triangles, uvs * 2),
        "negative": (positions, triangles, uvs - 0.5),
        "many collapsed": (positions, triangles, collapsed_many),
        "all zero": (positions, triangles, np.zeros_like(uvs)),
        "nan": (positions, triangles, np.where(np.arange(len(uvs))[:, None] == 4, np.nan, uvs).astype(np.float32)),
    }


@pytest.mark.parametrize("case, problem", [
    ("good", None), ("a few collapsed", None), ("exporter noise", None),
    ("tiled", "outside [0, 1]"), ("negative", "outside [0, 1]"), ("many collapsed", "collapse to zero area"),
    ("all zero", "collapse to zero area"), ("nan", "not finite"),
])
def test_usable_uvs_lie_inside_the_unit_square_and_cover_the_surface(case: str, problem: str | None) -> None:
    found = texturing.uv_problem(*uv_cases()[case])
    assert found is None if problem is None else problem in found


def test_the_uv_rule_agrees_with_the_backends() -> None:
    """The add-on sends only UVs the backend keeps: both rules must say the same of every case."""
    bake_onto = pytest.importorskip("backend.asset.bake_onto", reason="needs the backend's environment (torch)")
    user_mesh = pytest.importorskip("backend.ovoxel.user_mesh", reason="needs the backend's environment (torch)")
    for case, (positions, triangles, uvs) in uv_cases().items():
        mesh = user_mesh.UserMesh.checked(positions, triangles, uvs.reshape(-1, 3, 2))
        backend_keeps = bake_onto.uv_problem(mesh) is None
        assert (texturing.uv_problem(positions, triangles, uvs) is None) == backend_keeps, case


# -- the result --------------------------------------------------------------------------------------


def answer(**change) -> tuple[dict, dict, dict, np.ndarray]:
    """(mesh, textures, metadata, sent UVs) of a texture result for the plane, with `change` applied."""
    _, _, uvs = plane()
    mesh, textures, metadata = {"uvs": uvs.copy()}, synthetic.textures(8), dict(TEXTURE_METADATA)
    for key, value in change.items():
        group = mesh if key == "uvs" else textures if key in textures else metadata
        group.pop(key) if value is None else group.__setitem__(key, value)
    return mesh, textures, metadata, uvs


def test_a_texture_result_becomes_a_material_for_the_uvs_that_were_sent() -> None:
    surface = surface_textures(*answer())
    material = surface.material
    assert (material.alpha_mode, material.alpha_cutoff, material.double_sided) == ("MASK", 0.4, False)
    assert (material.base_color.width, material.base_color.height) == (8, 8)
    pixels = material.base_color.pixels.reshape(8, 8, 4)
    assert np.allclose(pixels[0, 0, :3], np.array(synthetic.BLUE) / 255)  # bottom row first, as Blender wants
    assert surface.metadata["uvs"] == "kept"


@pytest.mark.parametrize("change, complaint", [
    ({"uvs": None}, "no mesh array 'uvs'"),
    ({"uvs": np.zeros((6, 2), np.float32)}, "UVs for 6 face corners, the request had 54"),
    ({"uvs": np.full((54, 2), 0.5, np.float32), "uvs_said": "new atlas: xatlas"},
     "UVs of its own (new atlas: xatlas), not the object's UV map"),
    ({"uvs": np.full((54, 2), np.nan, np.float32)}, "UVs of its own"),
    ({"base_color": np.zeros((8, 8, 4), np.float32)}, "'base_color' is float32"),
    ({"alpha_mode": "SOMETIMES"}, "alpha_mode='SOMETIMES'"),
    ({"uvs_said": 7}, "metadata 'uvs' is 7"),
])
def test_a_texture_result_that_breaks_the_contract_is_refused(change: dict, complaint: str) -> None:
    said = change.pop("uvs_said", "kept")
    mesh, textures, metadata, sent = answer(**change)
    metadata["uvs"] = said
    with pytest.raises(AddonError) as info:
        surface_textures(mesh, textures, metadata, sent)
    assert complaint in info.value.message and info.value.hint


# -- a texture job -----------------------------------------------------------------------------------


def test_a_texture_job_delivers_the_checked_material(tmp_path) -> None:
    fake = FakeServer(backend_handler())
    try:
        positions, triangles, uvs = plane()
        request = texturing.texture_request(png_bytes(), positions, triangles, uvs,
                                            {"texture_size": 256, "seed": 5})
        connection = Connection(fake.address)
        job = RemoteJob("plane", lambda say: connection.client(), request=request,
                        read_result=texturing.result_reader(request))
        job.run_here()
        assert job.state == "done", job.error
        assert isinstance(job.outcome, SurfaceTextures) and job.outcome.material.base_color.width == 256
        sent = next(m for m in fake.received if isinstance(m, wire.Texture))
        assert np.array_equal(sent.mesh["positions"], positions) and sent.settings == {"texture_size": 256, "seed": 5}
    finally:
        fake.stop()


def test_a_texture_job_whose_result_has_other_uvs_fails_before_blender_sees_it() -> None:
    def new_atlas(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Texture):
            result = texture_result(msg)
            result.mesh["uvs"] = result.mesh["uvs"][::-1].copy()
            result.metadata["uvs"] = "new atlas: the sent UVs reach outside [0, 1]"
            return [wire.Accepted("job-1", 0, msg.client_job_id), result]
        return backend_handler()(msg)

    fake = FakeServer(new_atlas)
    try:
        positions, triangles, uvs = plane()
        request = texturing.texture_request(png_bytes(), positions, triangles, uvs, {})
        connection = Connection(fake.address)
        job = RemoteJob("plane", lambda say: connection.client(), request=request,
                        read_result=texturing.result_reader(request))
        job.run_here()
        assert job.state == "failed" and job.outcome is None
        assert "new atlas: the sent UVs reach outside [0, 1]" in job.error.message
    finally:
        fake.stop()
