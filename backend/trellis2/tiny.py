"""`python -m backend tiny-checkpoint DIR`: a complete, random, tiny checkpoint in the exact hub layout.

Same classes, same files (pipeline.json, texturing_pipeline.json, ckpts/NAME.json + .safetensors, a DINOv3
folder, a background-removal model) as microsoft/TRELLIS.2-4B, at sizes that run the whole path on a CPU in seconds. Every end-to-end test uses
it, so nothing in the tests needs the network. Grids are scaled down 4× (structure 4³ → 16³ occupancy, latent grids
8³ and 16³, assets at 128/256/384), so every pipeline type still takes its own code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from backend.trellis2.checkpoint import build_model, save_checkpoint
from backend.trellis2.pipeline_types import TEXTURING_MODELS

LATENT = 8  # latent channels of the tiny structured latents (32 in the real model)
GRID_SCALE = 0.25  # every grid at a quarter of the reference's (pipeline_types.Grids); only our JSONs carry it


def _flow(resolution: int, in_channels: int) -> dict[str, Any]:
    return {
        "resolution": resolution, "in_channels": in_channels, "out_channels": LATENT, "model_channels": 64,
        "cond_channels": 32, "num_blocks": 2, "num_heads": 2, "mlp_ratio": 5.3334, "pe_mode": "rope",
        "share_mod": True, "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True,
        "dtype": "float32",
    }


def _sc_vae(**extra: Any) -> dict[str, Any]:
    return {
        "model_channels": [32, 16, 8, 8, 8], "latent_channels": LATENT, "num_blocks": [1, 0, 0, 0, 0],
        "block_type": ["SparseConvNeXtBlock3d"] * 5, "up_block_type": ["SparseResBlockC2S3d"] * 4,
        "block_args": [{}] * 5, "use_fp16": False, **extra,
    }


MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # key: (checkpoint stem, class name, args)
    "sparse_structure_flow_model": ("ckpts/ss_flow_tiny", "SparseStructureFlowModel", {**_flow(4, 8)}),
    "sparse_structure_decoder": ("ckpts/ss_dec_tiny", "SparseStructureDecoder", {
        "out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [32, 16, 8],
        "num_res_blocks_middle": 1, "use_fp16": False}),
    "shape_slat_flow_model_512": ("ckpts/shape_flow_tiny_512", "SLatFlowModel", _flow(8, LATENT)),
    "shape_slat_flow_model_1024": ("ckpts/shape_flow_tiny_1024", "SLatFlowModel", _flow(16, LATENT)),
    "shape_slat_decoder": ("ckpts/shape_dec_tiny", "FlexiDualGridVaeDecoder", _sc_vae(resolution=256)),
    "tex_slat_flow_model_512": ("ckpts/tex_flow_tiny_512", "SLatFlowModel", _flow(8, 2 * LATENT)),
    "tex_slat_flow_model_1024": ("ckpts/tex_flow_tiny_1024", "SLatFlowModel", _flow(16, 2 * LATENT)),
    "tex_slat_decoder": ("ckpts/tex_dec_tiny", "SparseUnetVaeDecoder", _sc_vae(out_channels=6, pred_subdiv=False)),
    # The decoders' mirror: fine -> coarse channels, four spatial-to-channel down-blocks (x16 coarser).
    "shape_slat_encoder": ("ckpts/shape_enc_tiny", "FlexiDualGridVaeEncoder", {
        "model_channels": [8, 8, 8, 16, 32], "latent_channels": LATENT, "num_blocks": [0, 0, 0, 0, 1],
        "block_type": ["SparseConvNeXtBlock3d"] * 5, "down_block_type": ["SparseResBlockS2C3d"] * 4,
        "block_args": [{}] * 5, "use_fp16": False}),
}
# Which models each pipeline JSON names (as on the hub: the image pipeline has no encoder, texturing no shape flows).
IMAGE_PIPELINE_MODELS = [name for name in MODELS if name != "shape_slat_encoder"]

SAMPLERS = {
    "sparse_structure_sampler": dict(steps=12, guidance_strength=7.5, guidance_rescale=0.7,
                                     guidance_interval=[0.6, 1.0], rescale_t=5.0),
    "shape_slat_sampler": dict(steps=12, guidance_strength=7.5, guidance_rescale=0.5,
                               guidance_interval=[0.6, 1.0], rescale_t=3.0),
    "tex_slat_sampler": dict(steps=12, guidance_strength=1.0, guidance_rescale=0.0,
                             guidance_interval=[0.6, 0.9], rescale_t=3.0),
}

# Output biases for the random tiny networks, chosen by trying: a sparse structure (a few dozen latent tokens at the
# high resolution) and subdivision logits centred at zero (about half the children kept), which gives a small but
# connected enough surface (hundreds of faces) for every path to produce a mesh in about a second on a CPU.
OCCUPANCY_BIAS = -1.0
SUBDIVISION_BIAS = 0.0


def _tune(name: str, model: torch.nn.Module) -> None:
    with torch.no_grad():
        if name == "sparse_structure_decoder":
            model.out_layer[2].bias.fill_(OCCUPANCY_BIAS)
        for module_name, module in model.named_modules():
            if module_name.endswith("to_subdiv"):
                module.bias.fill_(SUBDIVISION_BIAS)


def write_tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint under `root` (created if needed) and return it."""
    from backend.trellis2.background import write_tiny_background_model
    from backend.trellis2.image_cond import write_tiny_dinov3

    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, (stem, class_name, args) in MODELS.items():
            config = {"name": class_name, "args": args}
            model = build_model(config, "cpu")
            _tune(name, model)
            save_checkpoint(model, config, root / stem)
        generator = torch.Generator().manual_seed(seed)

        def normalization() -> dict[str, list[float]]:
            return {"mean": (0.3 * torch.randn(LATENT, generator=generator)).tolist(),
                    "std": (1.0 + 0.2 * torch.rand(LATENT, generator=generator)).tolist()}

        write_tiny_dinov3(root / "dinov3", seed=seed)
        write_tiny_background_model(root / "rembg" / "tiny.onnx", seed=seed)
        image_conditioning = {
            "image_cond_model": {"name": "DinoV3FeatureExtractor", "args": {"model_name": "dinov3"}},
            "rembg_model": {"name": "rembg", "args": {"model_path": "rembg/tiny.onnx"}},
        }
        shape_norm, tex_norm = normalization(), normalization()

        def sampler(key: str) -> dict[str, Any]:
            return {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5}, "params": SAMPLERS[key]}

        pipeline = {
            "name": "Trellis2ImageTo3DPipeline",
            "args": {
                "models": {name: MODELS[name][0] for name in IMAGE_PIPELINE_MODELS},
                **{key: sampler(key) for key in SAMPLERS},
                "shape_slat_normalization": shape_norm,
                "tex_slat_normalization": tex_norm,
                **image_conditioning,
                "default_pipeline_type": "1024_cascade",
                "grid_scale": GRID_SCALE,
            },
        }
        texturing = {
            "name": "Trellis2TexturingPipeline",
            "args": {
                "models": {name: MODELS[name][0] for name in TEXTURING_MODELS},
                "shape_slat_normalization": shape_norm,
                "tex_slat_sampler": sampler("tex_slat_sampler"),
                "tex_slat_normalization": tex_norm,
                **image_conditioning,
                "grid_scale": GRID_SCALE,
            },
        }
    (root / "pipeline.json").write_text(json.dumps(pipeline, indent=4))
    (root / "texturing_pipeline.json").write_text(json.dumps(texturing, indent=4))
    return root
