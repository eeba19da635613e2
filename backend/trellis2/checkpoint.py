"""Checkpoint loading in the official hub layout, strictly.

A checkpoint is a stem: ``STEM.json`` (``{"name": class, "args": kwargs}``) next to ``STEM.safetensors``.
Stems are resolved as the reference does (spec §1.4): ``{root}/{stem}`` first (a local folder or a file in the
root's hub repo), then the stem alone as ``owner/repo/path`` on the hub — which is how the sparse-structure decoder
stem ``microsoft/TRELLIS-image-large/ckpts/...`` is found. Unlike the reference (strict=False), every key must be
present and used with its exact shape; the only tolerated absences are buffers a model computes itself
(``COMPUTED_BUFFERS``, e.g. the dense flow's ``rope_phases``, which the real files do not store).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend.progress import report_loading

log = logging.getLogger(__name__)

# Checkpoint class name -> "module:attribute". Both names of the structured-latent flow are accepted:
# the hub JSONs say SLatFlowModel, the training configs ElasticSLatFlowModel (same inference network).
MODEL_CLASSES = {
    "SparseStructureFlowModel": "backend.trellis2.ss_flow:SparseStructureFlowModel",
    "SLatFlowModel": "backend.trellis2.slat_flow:SLatFlowModel",
    "ElasticSLatFlowModel": "backend.trellis2.slat_flow:ElasticSLatFlowModel",
    "SparseStructureDecoder": "backend.trellis2.ss_decoder:SparseStructureDecoder",
    "SparseUnetVaeDecoder": "backend.trellis2.sc_vae:SparseUnetVaeDecoder",
    "FlexiDualGridVaeDecoder": "backend.trellis2.sc_vae:FlexiDualGridVaeDecoder",
    "FlexiDualGridVaeEncoder": "backend.trellis2.sc_vae_encoder:FlexiDualGridVaeEncoder",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message names the file and the offending key."""


@dataclass(frozen=True)
class CheckpointFiles:
    config: Path
    weights: Path


def model_class(name: str) -> type[nn.Module]:
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model class {name!r}; known: {', '.join(sorted(MODEL_CLASSES))}")
    module_name, attr = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_model(config: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """Instantiate `{name, args}` on `device` ("meta" builds the structure without allocating memory)."""
    if not isinstance(config, dict) or "name" not in config or not isinstance(config.get("args", {}), dict):
        raise CheckpointError("a checkpoint config must be a JSON object {\"name\": CLASS, \"args\": {...}}")
    cls = model_class(config["name"])
    with torch.device(device):
        try:
            return cls(**config.get("args", {}))
        except TypeError as exc:
            raise CheckpointError(f"{config['name']}: bad constructor args: {exc}") from exc


def computed_buffer_names(model: nn.Module) -> set[str]:
    """Fully qualified names of buffers that models compute themselves and checkpoints may omit."""
    names = set()
    for prefix, module in model.named_modules():
        for buf in getattr(module, "COMPUTED_BUFFERS", ()):
            names.add(f"{prefix}.{buf}" if prefix else buf)
    return names


def compute_buffers(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "compute_buffers"):
            module.compute_buffers()


def load_weights_strict(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` into `model` (each tensor cast to its parameter's dtype), refusing any mismatch."""
    expected = model.state_dict()
    optional = computed_buffer_names(model)
    missing = [k for k in expected if k not in weights and k not in optional]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [
        f"{k}: file {list(weights[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing key", missing), ("unexpected key", unexpected), ("wrong shape", misshaped)):
        if items:
            more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}(s): {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))
    full = {k: weights.get(k, v) for k, v in expected.items()}
    model.load_state_dict(full, strict=True)


def load_model(files: CheckpointFiles, device: torch.device | str = "cpu") -> nn.Module:
    """Build the model from its JSON and load its safetensors strictly; returns it in eval mode."""
    from safetensors.torch import load_file

    try:
        config = json.loads(files.config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint config {files.config}: {exc}") from exc
    # Build on meta, then allocate uninitialised storage: no time is spent on random init of 1.3B weights.
    model = build_model(config, "meta").to_empty(device=device)
    compute_buffers(model)
    try:
        weights = load_file(str(files.weights), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {files.weights}: {exc}") from exc
    load_weights_strict(model, weights, str(files.weights))
    return model.eval()


def resolve_stem(root: str, stem: str) -> CheckpointFiles:
    """Find `stem.json` + `stem.safetensors` the way the reference does (spec §1.4)."""
    errors = []
    for candidate in (f"{root}/{stem}", stem):
        local = Path(candidate)
        cfg, wts = local.with_name(local.name + ".json"), local.with_name(local.name + ".safetensors")
        if cfg.is_file() and wts.is_file():
            return CheckpointFiles(cfg, wts)
        try:
            return _download_stem(candidate)
        except Exception as exc:  # any failure falls through to the next form, as in the reference
            errors.append(f"{candidate}: {exc}")
    raise CheckpointError(
        f"checkpoint {stem!r} not found locally under {root!r} nor on the Hugging Face hub ("
        + " | ".join(errors)
        + "). Put STEM.json and STEM.safetensors under the weights folder, or: "
        + hub_hint()
    )


def hub_hint() -> str:
    """What to do when the hub cannot be reached: the same advice wherever a download fails."""
    from huggingface_hub import constants

    return (
        "download once where there is a connection (`hf download microsoft/TRELLIS.2-4B` and "
        "`hf download microsoft/TRELLIS-image-large`; DINOv3 is gated: accept its licence on the hub page and "
        f"`hf auth login` first); downloads are cached in {constants.HF_HUB_CACHE} (set HF_HOME to move it); "
        "with HF_HUB_OFFLINE=1 only that cache and local folders are used"
    )


def _download_stem(path: str) -> CheckpointFiles:
    parts = path.split("/")
    if len(parts) < 3:
        raise CheckpointError(f"{path!r} is not of the form owner/repo/path")
    from huggingface_hub import hf_hub_download

    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    cfg = hf_hub_download(repo_id=repo, filename=f"{sub}.json")
    wts = hf_hub_download(repo_id=repo, filename=f"{sub}.safetensors")
    return CheckpointFiles(Path(cfg), Path(wts))


def read_pipeline_config(root: str, config_file: str = "pipeline.json") -> dict[str, Any]:
    """A pipeline JSON (`pipeline.json`, or e.g. `texturing_pipeline.json`) of a local weights folder or a hub repo."""
    local = Path(root) / config_file
    if Path(root).is_dir() and not local.is_file():
        raise CheckpointError(f"{root} has no {config_file}: give the folder of a TRELLIS.2 checkpoint ({config_file} "
                              "+ ckpts/) or a Hugging Face repo id such as microsoft/TRELLIS.2-4B")
    if not Path(root).exists() and (root.startswith(("/", ".", "~")) or root.count("/") != 1):
        raise CheckpointError(f"weights folder {root} does not exist (and it is not a Hugging Face repo id "
                              "owner/name): check the path, or pass e.g. microsoft/TRELLIS.2-4B")
    try:
        if local.is_file():
            text = local.read_text()
        else:
            from huggingface_hub import hf_hub_download

            text = Path(hf_hub_download(repo_id=root, filename=config_file)).read_text()
        config = json.loads(text)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {config_file} from {root!r} ({str(exc).splitlines()[0]}). Pass a folder holding "
            f"{config_file} and ckpts/, or {hub_hint()}"
        ) from exc
    if not isinstance(config.get("args", {}).get("models"), dict):
        raise CheckpointError(f"{root}/{config_file} has no args.models map")
    return config


def load_pipeline_models(
    root: str,
    names: list[str] | None = None,
    device: torch.device | str = "cpu",
    config: dict[str, Any] | None = None,
) -> dict[str, nn.Module]:
    """Load the models named in pipeline.json's `args.models` (all, or only `names`).

    `config` is the already-read pipeline JSON (pipeline.json or another, e.g. texturing_pipeline.json)."""
    stems = (config or read_pipeline_config(root))["args"]["models"]
    wanted = list(stems) if names is None else names
    absent = [n for n in wanted if n not in stems]
    if absent:
        raise CheckpointError(f"{root}'s pipeline JSON names no model {', '.join(absent)}; "
                              "use the complete microsoft/TRELLIS.2-4B layout")
    models = {}
    for index, name in enumerate(wanted):
        log.info("loading %s", name)
        report_loading("loading", name, index, len(wanted))
        models[name] = load_model(resolve_stem(root, stems[name]), device)
    report_loading("loading", "", len(wanted), len(wanted))
    return models


def save_checkpoint(model: nn.Module, config: dict[str, Any], stem: Path, dtype: torch.dtype | None = None) -> None:
    """Write `stem.json` + `stem.safetensors` in the hub layout (computed buffers left out, as the hub does).

    `dtype` stores every floating tensor in one dtype, as the real files do (bf16 flows, fp16 decoders).
    """
    from safetensors.torch import save_file

    skip = computed_buffer_names(model)
    tensors = {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.detach().cpu().contiguous()
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(config, indent=4))
    save_file(tensors, str(stem.with_name(stem.name + ".safetensors")))


def state_dict_manifest(model: nn.Module) -> list[list[Any]]:
    """[[name, shape, dtype], ...] in state-dict order (the format of shared/reference/manifests)."""
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def print_manifest(ckpt_json: str) -> int:
    """CLI: build the model of a `{name, args}` JSON on the meta device and print its manifest."""
    try:
        config = json.loads(Path(ckpt_json).read_text())
        model = build_model(config, "meta")
    except (OSError, json.JSONDecodeError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state_dict_manifest(model)))
    return 0
