"""Checkpoint loading: the hub layout round trip, strictness, class names, stem resolution, the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.__main__ import main as cli
from backend.trellis2 import checkpoint
from backend.trellis2.checkpoint import (
    CheckpointError,
    CheckpointFiles,
    build_model,
    load_model,
    load_pipeline_models,
    resolve_stem,
    save_checkpoint,
)

FLOW_ARGS = {
    "resolution": 8, "in_channels": 8, "out_channels": 8, "model_channels": 64, "cond_channels": 32,
    "num_blocks": 2, "num_heads": 2, "mlp_ratio": 5.3334, "pe_mode": "rope", "share_mod": True,
    "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "bfloat16",
}


def _write(tmp_path: Path, name: str, args: dict, stored_dtype: torch.dtype | None = None) -> tuple[Path, torch.nn.Module]:
    config = {"name": name, "args": args}
    model = build_model(config)
    save_checkpoint(model, config, tmp_path / "ckpts" / "model", dtype=stored_dtype)
    return tmp_path / "ckpts" / "model", model


def _files(stem: Path) -> CheckpointFiles:
    return CheckpointFiles(stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors"))


@pytest.mark.parametrize("name", ["SLatFlowModel", "ElasticSLatFlowModel"])
def test_round_trip_in_hub_layout_keeps_values_and_constructed_dtypes(tmp_path, name) -> None:
    stem, original = _write(tmp_path, name, FLOW_ARGS, stored_dtype=torch.bfloat16)
    stored = load_file(str(stem.with_name("model.safetensors")))
    assert all(v.dtype == torch.bfloat16 for v in stored.values())  # as the real flow files
    loaded = load_model(_files(stem))
    for key, value in original.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype, key  # fp32 embeddings stay fp32, bf16 torso stays bf16
        assert torch.equal(got, value.to(torch.bfloat16).to(value.dtype)), key
    assert not loaded.training


def test_dense_flow_loads_without_the_rope_buffer_the_real_files_lack(tmp_path) -> None:
    args = {**FLOW_ARGS, "resolution": 4}
    stem, original = _write(tmp_path, "SparseStructureFlowModel", args)
    assert "rope_phases" not in load_file(str(stem.with_name("model.safetensors")))
    loaded = load_model(_files(stem))
    assert torch.equal(loaded.rope_phases, original.rope_phases)


@pytest.mark.parametrize("edit, fragment", [
    (lambda sd: sd.pop("blocks.0.mlp.mlp.0.weight"), "missing key.*blocks.0.mlp.mlp.0.weight"),
    (lambda sd: sd.__setitem__("blocks.0.extra", torch.zeros(1)), "unexpected key.*blocks.0.extra"),
    (lambda sd: sd.__setitem__("out_layer.bias", torch.zeros(5)), "wrong shape.*out_layer.bias"),
])
def test_strict_loading_names_the_key_and_the_file(tmp_path, edit, fragment) -> None:
    stem, _ = _write(tmp_path, "SLatFlowModel", FLOW_ARGS)
    weights_file = stem.with_name("model.safetensors")
    state = load_file(str(weights_file))
    edit(state)
    save_file(state, str(weights_file))
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_model(_files(stem))
    assert str(weights_file) in str(info.value)


def test_unknown_class_and_bad_args_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="unknown model class 'NopeModel'"):
        build_model({"name": "NopeModel", "args": {}})
    with pytest.raises(CheckpointError, match="bad constructor args"):
        build_model({"name": "SLatFlowModel", "args": {**FLOW_ARGS, "wings": 2}})


def test_stems_resolve_locally_first_then_as_a_cross_repo_hub_path(tmp_path, monkeypatch) -> None:
    stem, _ = _write(tmp_path, "SLatFlowModel", FLOW_ARGS)
    assert resolve_stem(str(tmp_path), "ckpts/model").weights == stem.with_name("model.safetensors")

    asked = []

    def fake_hub(path: str) -> CheckpointFiles:
        asked.append(path)
        if path.startswith(str(tmp_path)):
            raise FileNotFoundError(path)
        return _files(stem)

    monkeypatch.setattr(checkpoint, "_download_stem", fake_hub)
    files = resolve_stem(str(tmp_path), "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16")
    assert files.weights == stem.with_name("model.safetensors")
    assert asked == [f"{tmp_path}/microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
                     "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16"]


def test_missing_weights_error_says_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "_download_stem", lambda path: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(CheckpointError, match="hf auth login") as info:
        resolve_stem(str(tmp_path), "ckpts/absent")
    assert "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(CheckpointError, match="no pipeline.json"):
        load_pipeline_models(str(tmp_path))


def test_pipeline_models_load_from_the_tiny_checkpoint(tiny_checkpoint) -> None:
    models = load_pipeline_models(str(tiny_checkpoint))
    assert set(models) == set(json.loads((tiny_checkpoint / "pipeline.json").read_text())["args"]["models"])


def test_manifest_command_prints_the_reference_manifest(load_manifest, tmp_path, capsys) -> None:
    manifest = load_manifest("shape_slat_decoder")
    cfg = tmp_path / "ckpt.json"
    cfg.write_text(json.dumps({"name": manifest["class_name"], "args": manifest["args"]}))
    assert cli(["manifest", str(cfg)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == [entry[:3] for entry in manifest["state_dict"]]


def test_golden_command_passes_every_shared_case(golden_dir, golden_texturing_dir, capsys) -> None:
    cases = sorted(str(p) for folder in (golden_dir, golden_texturing_dir) for p in folder.iterdir()
                   if (p / "case.json").is_file())
    assert cli(["golden", *cases]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"{len(cases)} passed, 0 failed"


def test_golden_command_fails_an_unknown_kind_with_the_reason(tmp_path, capsys) -> None:
    case = tmp_path / "odd_case"
    case.mkdir()
    (case / "case.json").write_text(json.dumps({"kind": "teleporter_forward"}))
    save_file({"in.x": torch.zeros(1)}, str(case / "tensors.safetensors"))
    assert cli(["golden", str(case)]) == 1
    out = capsys.readouterr().out
    assert "teleporter_forward" in out and "not supported" in out and out.strip().endswith("0 passed, 1 failed")
