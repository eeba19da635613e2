"""The whole generation pipeline on the tiny checkpoint: every pipeline type, seeds, progress, cancel, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.errors import JobFailure, OutOfMemory, UnsupportedSetting
from backend.ovoxel.ovoxel import OVoxel
from backend.progress import StopRequested
from backend.trellis2 import pipeline as pipeline_module
from backend.trellis2.pipeline import (
    PIPELINE_TYPES,
    GenerationSettings,
    ModelStore,
    Trellis2Pipeline,
    choose_offload,
)
from backend.trellis2.stages import seeded_noise
from protocol import InvalidSettings
from protocol.settings import PIPELINE_TYPES as SCHEMA_PIPELINE_TYPES


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> Trellis2Pipeline:
    return Trellis2Pipeline.from_pretrained(str(tiny_checkpoint), device="cpu")


FAST = {"sparse_structure_steps": 3, "shape_steps": 3, "texture_steps": 3}


def _fast(pipe: Trellis2Pipeline, **extra) -> GenerationSettings:
    return pipe.settings({**FAST, **extra})


@pytest.mark.parametrize("pipeline_type", sorted(PIPELINE_TYPES))
def test_every_pipeline_type_produces_a_valid_ovoxel(pipe, image, pipeline_type) -> None:
    result = pipe.run(image, _fast(pipe, pipeline_type=pipeline_type))
    assert isinstance(result, OVoxel)
    assert result.coords.shape[0] > 0 and result.attrs.shape == (result.coords.shape[0], 6)
    assert np.isfinite(result.attrs).all() and np.isfinite(result.vertices).all()
    assert result.coords.min() >= 0 and result.coords.max() < result.resolution
    if result.faces.size:
        assert result.faces.max() < result.vertices.shape[0]
    # tiny grids are the real ones / 4: 512 -> 128, 1024 -> 256, 1536 -> 384
    expected = {"512": 128, "1024": 256, "1024_cascade": 256, "1536_cascade": 384}[pipeline_type]
    assert result.resolution == expected
    assert result.metadata["pipeline_type"] == pipeline_type


def test_seed_reproduces_and_different_seeds_differ(pipe, image) -> None:
    a = pipe.run(image, _fast(pipe, seed=7))
    b = pipe.run(image, _fast(pipe, seed=7))
    c = pipe.run(image, _fast(pipe, seed=8))
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.attrs, b.attrs)
    assert not (a.coords.shape == c.coords.shape and np.array_equal(a.attrs, c.attrs))


def test_seeded_noise_matches_the_reference_global_generator_order() -> None:
    draw = seeded_noise(123)
    ours = [draw((2, 3)), draw((4,))]
    torch.manual_seed(123)
    reference = [torch.randn(2, 3), torch.randn(4)]
    assert all(torch.equal(x, y) for x, y in zip(ours, reference))


def test_progress_reports_every_stage_in_order_with_step_counts(pipe, image) -> None:
    events: list[tuple[str, int, int]] = []
    settings = pipe.settings({"shape_steps": 4, "sparse_structure_steps": 2, "texture_steps": 3})
    pipe.run(image, settings, lambda *e: events.append(e))
    stages = list(dict.fromkeys(stage for stage, _, _ in events))
    assert stages == [s.name for s in pipe.stages(settings)]
    assert stages == ["preprocess", "condition", "sparse_structure", "shape_lr", "upsample", "shape_hr", "texture",
                      "decode"]
    totals = {stage: total for stage, _, total in events}
    assert totals["sparse_structure"] == 2 and totals["shape_hr"] == 4 and totals["texture"] == 3
    for stage in stages:
        steps = [step for s, step, _ in events if s == stage]
        assert steps == sorted(steps) and steps[-1] == totals[stage]


def test_cancel_between_steps_stops_the_job_and_the_pipeline_stays_usable(pipe, image) -> None:
    seen = []

    def cancel_in_shape(stage: str, step: int, total: int) -> None:
        seen.append(stage)
        if stage == "shape_hr" and step == 1:
            raise StopRequested()

    with pytest.raises(StopRequested):
        pipe.run(image, _fast(pipe), cancel_in_shape)
    assert "texture" not in seen
    assert pipe.run(image, _fast(pipe)).coords.shape[0] > 0


def test_out_of_memory_becomes_a_clear_error_and_the_pipeline_stays_usable(pipe, image, monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(pipeline_module, "sample_texture_slat", oom)
        with pytest.raises(OutOfMemory) as info:
            pipe.run(image, _fast(pipe))
    assert info.value.code == "out_of_memory" and "offload" in info.value.hint
    assert pipe.run(image, _fast(pipe)).coords.shape[0] > 0


def test_image_without_alpha_goes_through_background_removal(pipe) -> None:
    rgb = np.full((90, 90, 3), 40, np.uint8)
    rgb[30:60, 30:60] = (70, 200, 130)
    result = pipe.run(Image.fromarray(rgb, "RGB"), _fast(pipe, pipeline_type="512"))
    assert result.coords.shape[0] > 0


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"pipeline_type": "2048"}, "pipeline_type"),
        ({"seed": True}, "seed"),
        ({"shape_stepz": 3}, "shape_stepz"),
        ({"texture_guidance_interval_start": 0.95, "texture_guidance_interval_end": 0.1}, "guidance_interval"),
        ({"remove_background": "yes"}, "remove_background"),
    ],
)
def test_bad_settings_are_rejected_with_the_field_named(pipe, raw, fragment) -> None:
    with pytest.raises(InvalidSettings, match=fragment):
        pipe.settings(raw)


def test_settings_take_the_checkpoints_defaults(pipe) -> None:
    settings = pipe.settings({})
    assert settings.pipeline_type == "1024_cascade"
    assert settings.samplers["texture"].guidance_interval == (0.6, 0.9)
    assert pipe.schema["shape_rescale_t"].default == settings.samplers["shape"].rescale_t


def test_the_schema_lists_exactly_the_pipeline_types_the_pipeline_runs() -> None:
    assert tuple(PIPELINE_TYPES) == SCHEMA_PIPELINE_TYPES


def test_a_pipeline_type_the_checkpoint_lacks_is_refused_clearly(tiny_checkpoint, image) -> None:
    only_512 = Trellis2Pipeline.from_pretrained(str(tiny_checkpoint), device="cpu", pipeline_types=("512",))
    with pytest.raises(UnsupportedSetting, match="1024_cascade"):
        only_512.run(image, _fast(only_512, pipeline_type="1024_cascade"))


def test_memory_mode_choice(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_offload("auto", cpu, 10**12) is False
    assert choose_offload("offload", cuda, 1) is True
    assert choose_offload("gpu", cuda, 10**12) is False
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 80 * 2**30))
    assert choose_offload("auto", cuda, 20 * 2**30) is False  # 20 GiB of models fit in 80 GiB free
    assert choose_offload("auto", cuda, 75 * 2**30) is True
    with pytest.raises(ValueError, match="memory mode"):
        choose_offload("lots", cuda, 1)


def test_offload_store_moves_a_model_in_only_while_used() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))  # parameters and buffers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    store = ModelStore({"m": model}, torch.device("cpu"), offload=True)  # on the CPU a "move" is a copy
    host = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with store.use("m") as used:
        assert used is model
        inside = model.state_dict()
        assert all(inside[k].data_ptr() != host[k] and torch.equal(inside[k], before[k]) for k in before)
    after = model.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == host  # back on the same host copies, nothing copied
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_missing_background_model_fails_only_the_jobs_that_need_it(tiny_checkpoint, image) -> None:
    from backend.trellis2.background import BackgroundModelError, LazyRemover

    pipe = Trellis2Pipeline.from_pretrained(str(tiny_checkpoint), device="cpu",
                                            remover=LazyRemover("/nonexistent/matte.onnx"))
    assert pipe.run(image, _fast(pipe)).coords.shape[0] > 0  # RGBA input: no background removal needed
    with pytest.raises(BackgroundModelError, match="/nonexistent/matte.onnx"):
        pipe.run(image.convert("RGB"), _fast(pipe))


def test_the_ovoxel_carries_a_dual_grid_that_rebuilds_the_decoded_mesh(pipe, image) -> None:
    from backend.ovoxel.encode import decode_dual_grid

    result = pipe.run(image, _fast(pipe, seed=5))
    vertices, faces = decode_dual_grid(result)
    assert np.array_equal(faces, result.faces)
    assert np.allclose(vertices, result.vertices, atol=1e-6)


@pytest.mark.parametrize("empty, pipeline_type, where", [
    ("sample_sparse_structure", "512", "sparse structure"),
    ("cascade_coords", "1024_cascade", "low-resolution shape"),
])
def test_no_object_found_is_a_job_failure_that_names_what_to_try(pipe, image, monkeypatch, empty, pipeline_type,
                                                                 where) -> None:
    real = getattr(pipeline_module, empty)

    def nothing(*args, **kwargs):
        out = real(*args, **kwargs)
        return (out[0][:0], *out[1:]) if isinstance(out, tuple) else out[:0]

    monkeypatch.setattr(pipeline_module, empty, nothing)
    with pytest.raises(JobFailure) as info:
        pipe.run(image, _fast(pipe, pipeline_type=pipeline_type))
    assert info.value.code == "job_failed" and "seed" in info.value.hint
    assert "produced no surface" in info.value.message and where in info.value.message


def test_a_flow_declaring_another_grid_than_the_reference_table_is_refused(tmp_path) -> None:
    import json

    from backend.trellis2.checkpoint import CheckpointError
    from backend.trellis2.tiny import write_tiny_checkpoint

    root = write_tiny_checkpoint(tmp_path / "tiny")
    stem = json.loads((root / "pipeline.json").read_text())["args"]["models"]["shape_slat_flow_model_1024"]
    config_file = root / f"{stem}.json"
    config = json.loads(config_file.read_text())
    config["args"]["resolution"] = 8  # the tiny 1024 flow runs on a 16^3 latent (64^3 at full size)
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        Trellis2Pipeline.from_pretrained(str(root), device="cpu")
    assert f"{stem}.json" in str(info.value) and "resolution 8" in str(info.value) and "16^3" in str(info.value)
