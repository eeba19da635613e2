"""DINOv3 image conditioning, as the reference's `DinoV3FeatureExtractor` computes it (spec §2.6).

The flows cross-attend to every token of DINOv3-ViT-L/16's last block (CLS, 4 registers, then the patches
row-major), normalised by a LayerNorm *without* affine parameters: the model's own final `norm`, whose learned
scale and shift the flows never saw, is skipped. The unconditional branch of classifier-free guidance is an
all-zeros tensor of the same shape, not the features of a blank image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.utils import logging as transformers_logging

DINOV3_REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_NORM_EPS = 1e-5


class DinoV3LoadError(RuntimeError):
    """The DINOv3 weights cannot be had; the message lists the ways to provide them."""


def images_to_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """[B, 3, size, size] float32: each image LANCZOS-resized, RGB scaled to [0, 1], ImageNet-normalised."""
    arrays = [np.asarray(image.resize((size, size), Image.Resampling.LANCZOS).convert("RGB"), dtype=np.float32)
              for image in images]
    pixels = torch.from_numpy(np.stack(arrays) / np.float32(255)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


class DinoV3Conditioner:
    """Turns preprocessed images into the flows' `cond` / `neg_cond` tensors. Runs in float32, as the reference."""

    def __init__(self, model: DINOv3ViTModel):
        self.model = model.float().eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DINOV3_REPO) -> DinoV3Conditioner:
        """Load from a hub id or a local folder (config.json + safetensors), on the CPU."""
        local = Path(name_or_path).expanduser()
        if local.is_dir():
            name_or_path = local
        elif isinstance(name_or_path, Path) or local.is_absolute() or str(name_or_path).startswith((".", "~")):
            raise DinoV3LoadError(f"DINOv3 folder not found: {local}; give the folder holding config.json and "
                                  f"model.safetensors, or the hub id {DINOV3_REPO}")
        transformers_logging.disable_progress_bar()  # our own progress reporting is the one users see
        try:
            model = DINOv3ViTModel.from_pretrained(str(name_or_path), dtype=torch.float32)
        except (OSError, ValueError) as exc:  # hub errors (gated, offline, missing files) all surface as these
            if local.is_dir():
                raise DinoV3LoadError(f"{local} does not hold a DINOv3 ViT model ({type(exc).__name__}: {exc}); "
                                      f"it needs config.json and model.safetensors as on the hub") from exc
            raise DinoV3LoadError(_hub_failure_message(str(name_or_path), exc)) from exc
        return cls(model)

    @classmethod
    def for_pipeline(cls, weights: str, args: dict) -> DinoV3Conditioner:
        """The model a pipeline JSON's `image_cond_model` names, from a copy under the weights folder if there is one."""
        name = args["image_cond_model"]["args"]["model_name"]
        local = Path(weights) / name
        return cls.from_pretrained(str(local) if local.exists() else name)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.weight.device

    def to(self, device: torch.device | str) -> DinoV3Conditioner:
        self.model.to(device)
        return self

    @torch.no_grad()
    def features(self, images: Image.Image | Sequence[Image.Image], size: int) -> torch.Tensor:
        """[B, 1 + registers + (size/patch)^2, hidden]: the last block's tokens, parameter-free LayerNorm'ed."""
        patch = self.model.config.patch_size
        if size <= 0 or size % patch:
            raise ValueError(f"DINOv3 input size must be a positive multiple of the patch size {patch}, got {size}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        pixels = images_to_pixels(images, size).to(self.device)
        last_block: dict[str, torch.Tensor] = {}
        # The last block's output is exactly what the model's final norm receives; catching it there works
        # with both module layouts transformers has used (`model.layer` and `model.model.layer`).
        hook = self.model.norm.register_forward_pre_hook(lambda _module, args: last_block.update(out=args[0]))
        try:
            self.model(pixel_values=pixels)
        finally:
            hook.remove()
        tokens = last_block["out"]
        return F.layer_norm(tokens, tokens.shape[-1:], eps=FEATURE_NORM_EPS)

    def get_cond(self, images: Image.Image | Sequence[Image.Image], size: int) -> dict[str, torch.Tensor]:
        """The reference's `get_cond`: features at `size` (512 or 1024) and the all-zeros negative."""
        cond = self.features(images, size)
        return {"cond": cond, "neg_cond": torch.zeros_like(cond)}


def _hub_failure_message(name: str, exc: Exception) -> str:
    return (
        f"could not load the DINOv3 image encoder {name!r} ({type(exc).__name__}: {exc}).\n"
        f"The official weights are gated. To get them: accept the licence at https://huggingface.co/{DINOV3_REPO} "
        f"while logged in, then run `hf auth login` (or set HF_TOKEN) on this machine; or download the "
        f"repository's files (config.json, model.safetensors) elsewhere and give their local folder instead."
        + (" HF_HUB_OFFLINE is set, so only the local cache and local folders are used."
           if huggingface_hub.constants.HF_HUB_OFFLINE else "")
    )


def write_tiny_dinov3(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random DINOv3 ViT (hidden 32, 2 layers, 2 heads, 4 registers, patch 16) for offline tests.

    Same architecture flags as ViT-L/16 (no key bias, LayerScale, RoPE theta 100, 4 registers), so the
    conditioner runs the same code on it; `DinoV3Conditioner.from_pretrained(path)` loads it.
    """
    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_register_tokens=4, patch_size=16, image_size=512, layerscale_value=0.5)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = DINOv3ViTModel(config)
        # A final norm left at its identity initialisation would hide a conditioner that wrongly applies it.
        model.norm.weight.normal_(1.0, 0.5)
        model.norm.bias.normal_(0.0, 0.5)
    path = Path(path)
    model.save_pretrained(path)
    return path
