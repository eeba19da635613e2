"""`python -m backend weights`: which files the pipelines need, what is here, and failing fast (seconds, one
message that says what to do) when files are missing and the hub cannot be reached."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend import weights
from backend.errors import ModelUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _backend(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_every_file_of_a_local_checkpoint_is_listed_and_found(tiny_checkpoint) -> None:
    run = _backend("weights", "check", "--weights", str(tiny_checkpoint), "--offline")
    assert run.returncode == 0, run.stderr
    config = weights.read_config(str(tiny_checkpoint))
    for stem in config["args"]["models"].values():
        assert f"{stem}.safetensors" in run.stdout
    assert "shape_slat_encoder" in run.stdout  # texturing's own model
    assert "all 18 files are here" in run.stderr


def test_a_missing_file_is_named_with_the_command_that_gets_it(tiny_checkpoint, tmp_path) -> None:
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, copy)
    stem = weights.read_config(str(copy))["args"]["models"]["shape_slat_flow_model_1024"]
    (copy / f"{stem}.safetensors").unlink()
    run = _backend("weights", "check", "--weights", str(copy), "--offline")
    assert run.returncode == 1 and f"{stem}.safetensors  [missing]" in run.stdout
    assert "python -m backend weights download" in run.stderr
    only_512 = _backend("weights", "check", "--weights", str(copy), "--offline", "--pipelines", "512")
    assert only_512.returncode == 0, only_512.stdout  # the 512 pipeline does not need the 1024 flow


def test_a_folder_without_texturing_provides_the_image_pipeline(tiny_checkpoint, tmp_path) -> None:
    """What the server accepts, the command accepts: texturing is an error only when asked for by name."""
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "texturing_pipeline.json").unlink()
    run = _backend("weights", "check", "--weights", str(copy), "--offline")
    assert run.returncode == 0, run.stderr
    assert "shape_slat_encoder" not in run.stdout
    asked = _backend("weights", "check", "--weights", str(copy), "--offline", "--pipelines", "texturing")
    assert asked.returncode == 1 and "holds no texturing_pipeline.json" in asked.stderr


def test_the_gated_dinov3_files_come_first() -> None:
    config = {"args": {"models": {"sparse_structure_flow_model": "ckpts/ss",
                                  "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec",
                                  "shape_slat_decoder": "ckpts/sd", "tex_slat_decoder": "ckpts/td",
                                  "shape_slat_flow_model_512": "ckpts/s512", "tex_slat_flow_model_512": "ckpts/t512"},
                       "image_cond_model": {"args": {"model_name": "facebook/dinov3-vitl16-pretrain-lvd1689m"}}}}
    files = weights.needed_files("microsoft/TRELLIS.2-4B", config, ["512"])
    assert [f.gated for f in files[:2]] == [True, True] and not any(f.gated for f in files[2:])
    assert weights.WeightFile("microsoft/TRELLIS-image-large", "ckpts/ss_dec.safetensors",
                              "sparse_structure_decoder") in files  # the cross-repo stem, where the loader looks


def test_without_the_files_and_without_the_hub_it_fails_within_seconds(tmp_path) -> None:
    started = time.monotonic()
    run = _backend("weights", "download", "--weights", "microsoft/TRELLIS.2-4B", HF_HUB_OFFLINE="1",
                   HF_HOME=str(tmp_path / "empty-cache"))
    assert run.returncode == 1 and time.monotonic() - started < 20
    assert run.stderr.count("error:") == 1 and "weights download" in run.stderr and "Traceback" not in run.stderr


def test_loading_fails_fast_offline_and_goes_offline_for_cached_files(monkeypatch, tiny_checkpoint) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # both restored after the test: going offline is for the process
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    weights.ensure_available(str(tiny_checkpoint), weights.PIPELINE_CHOICES)  # all here: nothing to fetch
    assert constants.HF_HUB_OFFLINE  # cached files are used without asking the hub from now on
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="hub cannot be reached"):
        weights.ensure_available("microsoft/not-cached-anywhere", ["512"])
    assert time.monotonic() - started < 5
