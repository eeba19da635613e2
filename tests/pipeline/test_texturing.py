"""The texturing pipeline on the tiny checkpoint, end to end on the CPU: mesh + image in, textures and UVs on the
caller's own mesh out; seeds, progress, cancel, settings, what is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from backend.asset.bake_onto import bake_onto, textured_mesh
from backend.asset.textured_mesh import AssetSettings
from backend.ovoxel.user_mesh import UserMesh
from backend.progress import StopRequested
from backend.trellis2.texturing import RESOLUTIONS, TEXTURING_STAGES, TexturingPipeline
from backend.trellis2.pipeline_types import TEXTURING_MODELS
from protocol import InvalidSettings
from protocol.settings import SETTINGS

FAST = {"resolution": 512, "texture_steps": 2}


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> TexturingPipeline:
    return TexturingPipeline.from_pretrained(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def box_with_uvs() -> UserMesh:
    """A box in the caller's own frame (off-centre, not unit size), one UV island per face."""
    m = trimesh.creation.box((1.5, 0.8, 2.2))
    m.apply_transform(trimesh.transformations.euler_matrix(0.3, 0.2, 0.1))
    m.apply_translation([4.0, -1.0, 0.5])
    cell = np.stack([np.arange(len(m.faces)) % 4, np.arange(len(m.faces)) // 4], axis=1) * 0.25  # 4 x 4 islands
    uvs = cell[:, None, :] + 0.25 * np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]])[None]
    return UserMesh.checked(np.asarray(m.vertices, np.float32), np.asarray(m.faces), uvs)


def test_loads_only_the_texturing_models(pipe, tiny_checkpoint) -> None:
    assert set(pipe.store.models) == set(TEXTURING_MODELS)
    config = json.loads((tiny_checkpoint / "texturing_pipeline.json").read_text())
    assert set(config["args"]["models"]) == set(TEXTURING_MODELS)


def test_mesh_in_textures_and_uvs_out_on_the_callers_own_vertices(pipe, image, box_with_uvs) -> None:
    mesh = box_with_uvs
    voxels = pipe.texture(mesh, image, pipe.settings(FAST))
    assert voxels.resolution == pipe.grids.texturing_grid(512) == 128  # the tiny checkpoint's quarter-size grids
    assert voxels.coords.shape[0] > 1000 and np.isfinite(voxels.attrs).all()
    assert voxels.metadata["kind"] == "texturing" and voxels.metadata["seed"] == 42
    baked = bake_onto(mesh, voxels, AssetSettings(texture_size=256), device="cpu")
    assert baked.uvs_kept
    np.testing.assert_array_equal(baked.uvs, mesh.uvs.astype(np.float32))
    assert baked.base_color.shape == (256, 256, 4) and baked.metallic_roughness.shape == (256, 256, 3)
    assert baked.base_color[..., :3].std() > 0  # textures, not a flat fill
    out = textured_mesh(mesh, baked)
    assert out.positions[:len(mesh.positions)].tobytes() == mesh.positions.tobytes()
    np.testing.assert_array_equal(out.positions[out.indices], mesh.positions[mesh.faces])


def test_seed_reproduces_and_different_seeds_differ(pipe, image, box_with_uvs) -> None:
    a = pipe.texture(box_with_uvs, image, pipe.settings({**FAST, "seed": 7}))
    b = pipe.texture(box_with_uvs, image, pipe.settings({**FAST, "seed": 7}))
    c = pipe.texture(box_with_uvs, image, pipe.settings({**FAST, "seed": 8}))
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.attrs, b.attrs)
    np.testing.assert_array_equal(a.coords, c.coords)  # the voxels are the mesh's: only the texture changes
    assert not np.array_equal(a.attrs, c.attrs)


def test_progress_reports_the_published_stages_in_order_and_cancel_stops(pipe, image, box_with_uvs) -> None:
    events: list[tuple[str, int, int]] = []
    pipe.texture(box_with_uvs, image, pipe.settings({**FAST, "texture_steps": 3}), lambda *e: events.append(e))
    assert list(dict.fromkeys(stage for stage, _, _ in events)) == [s.name for s in TEXTURING_STAGES]
    assert [e for e in events if e[0] == "texture"][-1] == ("texture", 3, 3)

    def cancel_in_texture(stage: str, step: int, total: int) -> None:
        if stage == "texture" and step == 1:
            raise StopRequested()

    with pytest.raises(StopRequested):
        pipe.texture(box_with_uvs, image, pipe.settings(FAST), cancel_in_texture)


@pytest.mark.parametrize("raw, fragment", [
    ({"resolution": 768}, "resolution"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"remove_background": "yes"}, "remove_background"),
    ({"texture_stepz": 3}, "texture_stepz"),
    ({"texture_steps": 0}, "texture_steps"),
    ({"faces": 1000}, "faces"),  # an asset setting a texture request does not take
])
def test_bad_settings_are_refused_by_name(pipe, raw, fragment) -> None:
    with pytest.raises(InvalidSettings, match=fragment):
        pipe.settings(raw)


def test_the_resolutions_are_the_schemas_choices_and_defaults_the_checkpoints(pipe) -> None:
    assert sorted(RESOLUTIONS) == sorted(c.value for c in SETTINGS["resolution"].choices)
    assert pipe.settings({}).sampler.guidance_interval == (0.6, 0.9)
