"""Texture requests on the shared loopback server (tiny checkpoint, real texturing pipeline and bake): the caller's
mesh in, per-corner UVs and textures out; stored and re-processable; meshes nothing could texture refused at once."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from protocol import Error, ErrorCode, RemoteError, Reprocess, Result, Texture
from server_testkit import connect, corrupt_png, last, png

FAST = {"resolution": 512, "texture_steps": 2, "texture_size": 256}


def box_arrays(with_uvs: bool = True) -> dict[str, np.ndarray]:
    """A box off the origin, each face its own UV island (per-corner UVs, [3F, 2])."""
    m = trimesh.creation.box((1.2, 0.7, 1.9))
    m.apply_translation([3.0, -1.0, 0.5])
    faces = np.asarray(m.faces, dtype=np.uint32)
    arrays = {"positions": np.asarray(m.vertices, dtype=np.float32), "indices": faces}
    if with_uvs:
        cell = np.stack([np.arange(len(faces)) % 4, np.arange(len(faces)) // 4], axis=1) * 0.25
        corner = cell[:, None, :] + 0.25 * np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]])[None]
        arrays["uvs"] = corner.reshape(-1, 2).astype(np.float32)
    return arrays


def test_the_server_offers_texturing(server):
    with connect(server.endpoint) as client:
        assert "texture" in client.hello().capabilities


def test_a_mesh_with_uvs_gets_textures_on_its_own_uvs_and_can_be_rebaked(server):
    mesh = box_arrays()
    with connect(server.endpoint) as client:
        client.hello()
        result = client.run(Texture(png(), mesh, FAST), timeout=120)
        assert isinstance(result, Result) and set(result.mesh) == {"uvs"}
        np.testing.assert_array_equal(result.mesh["uvs"], mesh["uvs"])  # the caller's UVs were kept
        assert result.textures["base_color"].shape == (256, 256, 4)
        assert result.textures["metallic_roughness"].shape == (256, 256, 3)
        assert result.metadata["uvs"] == "kept" and result.metadata["request"] == "texture"
        assert result.metadata["alpha_mode"] in ("OPAQUE", "MASK", "BLEND")
        again = client.run(Reprocess(result.job_id, {"texture_size": 512}), timeout=120)
    assert isinstance(again, Result) and again.textures["base_color"].shape == (512, 512, 4)
    np.testing.assert_array_equal(again.mesh["uvs"], mesh["uvs"])
    assert again.metadata["reprocessed_from"] == result.job_id


def test_a_mesh_without_uvs_gets_a_new_atlas_per_corner(server):
    mesh = box_arrays(with_uvs=False)
    with connect(server.endpoint) as client:
        client.hello()
        result = client.run(Texture(png(), mesh, FAST), timeout=120)
    assert result.mesh["uvs"].shape == (3 * len(mesh["indices"]), 2)
    assert result.metadata["uvs"].startswith("new atlas")
    assert 0 <= result.mesh["uvs"].min() and result.mesh["uvs"].max() <= 1


@pytest.mark.parametrize("broken, words", [
    (lambda m: {**m, "indices": np.zeros((0, 3), np.uint32)}, "empty"),
    (lambda m: {**m, "positions": np.full_like(m["positions"], np.nan)}, "not finite"),
    (lambda m: {**m, "indices": m["indices"] + 100}, "face indices"),
    (lambda m: {**m, "positions": np.zeros_like(m["positions"])}, "degenerate"),
    (lambda m: {**m, "uvs": m["uvs"][:5]}, "uvs must be"),
    (lambda m: {"positions": m["positions"]}, "lacks its indices"),
])
def test_meshes_nothing_could_texture_are_refused_at_once_naming_the_problem(server, broken, words):
    with connect(server.endpoint) as client:
        client.hello()
        with pytest.raises(RemoteError) as refused:
            client.submit(Texture(png(), broken(box_arrays()), FAST))
    assert refused.value.code == ErrorCode.INVALID_MESH and words in refused.value.message


def test_texture_settings_are_checked_like_any_others(server):
    with connect(server.endpoint) as client:
        client.hello()
        with pytest.raises(RemoteError) as refused:
            client.submit(Texture(png(), box_arrays(), {"faces": 1000}))
        assert refused.value.code == ErrorCode.INVALID_SETTINGS and "faces" in refused.value.message
        job_id = client.submit(Texture(corrupt_png(), box_arrays(), FAST))  # header fine, pixels garbage
        final = last(client.events(job_id, timeout=60))
    assert isinstance(final, Error) and final.code == ErrorCode.INVALID_IMAGE and final.hint
