"""The TRELLIS.2-4B networks at full size with random weights, and a pipeline made of them.

Speed and memory depend on sizes and token counts, not on weight values, so the benchmark needs no checkpoint.
Weights are N(0, 1/fan_in) (the goldens' randomisation), drawn straight on the target device. `calibrate` is the
older way to get plausible token counts from random decoders (shift their biases to an occupancy / subdivision
rate); `backend/bench/oracle.py` instead makes them follow a real shape's structure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backend.trellis2.checkpoint import build_model
from backend.trellis2.pipeline import ModelStore, Trellis2Pipeline
from backend.trellis2.pipeline_types import STRUCTURE_GRID
from backend.trellis2.sparse import SparseTensor

FLOW = {"model_channels": 1536, "cond_channels": 1024, "num_blocks": 30, "num_heads": 12, "mlp_ratio": 5.3334,
        "pe_mode": "rope", "share_mod": True, "initialization": "scaled", "qk_rms_norm": True,
        "qk_rms_norm_cross": True, "dtype": "bfloat16"}
DECODER = {"model_channels": [1024, 512, 256, 128, 64], "latent_channels": 32, "num_blocks": [4, 16, 8, 4, 0],
           "block_type": ["SparseConvNeXtBlock3d"] * 5, "up_block_type": ["SparseResBlockC2S3d"] * 4,
           "block_args": [{}] * 5, "use_fp16": True}
MODELS = {  # spec §1.3
    "sparse_structure_flow_model": ("SparseStructureFlowModel", {**FLOW, "resolution": 16, "in_channels": 8,
                                                                 "out_channels": 8}),
    "sparse_structure_decoder": ("SparseStructureDecoder", {"out_channels": 1, "latent_channels": 8,
                                                            "num_res_blocks": 2, "num_res_blocks_middle": 2,
                                                            "channels": [512, 128, 32], "use_fp16": True}),
    "shape_slat_flow_model_512": ("SLatFlowModel", {**FLOW, "resolution": 32, "in_channels": 32, "out_channels": 32}),
    "shape_slat_flow_model_1024": ("SLatFlowModel", {**FLOW, "resolution": 64, "in_channels": 32,
                                                     "out_channels": 32}),
    "shape_slat_decoder": ("FlexiDualGridVaeDecoder", {**DECODER, "resolution": 256}),
    "tex_slat_flow_model_512": ("SLatFlowModel", {**FLOW, "resolution": 32, "in_channels": 64, "out_channels": 32}),
    "tex_slat_flow_model_1024": ("SLatFlowModel", {**FLOW, "resolution": 64, "in_channels": 64, "out_channels": 32}),
    "tex_slat_decoder": ("SparseUnetVaeDecoder", {**DECODER, "out_channels": 6, "pred_subdiv": False}),
}
# The texturing pipeline's one model of its own (texturing.md §1.1); it shares the texture flows and decoder.
TEXTURING_ONLY = {"shape_slat_encoder": ("FlexiDualGridVaeEncoder", {
    "model_channels": [64, 128, 256, 512, 1024], "latent_channels": 32, "num_blocks": [0, 4, 8, 16, 4],
    "block_type": ["SparseConvNeXtBlock3d"] * 5, "down_block_type": ["SparseResBlockS2C3d"] * 4,
    "block_args": [{}] * 5, "use_fp16": True})}
SAMPLERS = {  # pipeline.json params (spec §1.2)
    "sparse_structure_sampler": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7,
                                 "guidance_interval": [0.6, 1.0], "rescale_t": 5.0},
    "shape_slat_sampler": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.5,
                           "guidance_interval": [0.6, 1.0], "rescale_t": 3.0},
    "tex_slat_sampler": {"steps": 12, "guidance_strength": 1.0, "guidance_rescale": 0.0,
                         "guidance_interval": [0.6, 0.9], "rescale_t": 3.0},
}
OCCUPANCY = 0.008  # calibration: fraction of the 64³ structure grid occupied
SUBDIVIDE = 0.5  # calibration: fraction of children kept per subdivided voxel (4 of 8)


def random_model(name: str, device: torch.device | str,
                 configs: dict[str, tuple[str, dict[str, Any]]] = MODELS) -> nn.Module:
    """Model `name` of `configs` (class name, args; default the full-size MODELS) with random weights, built
    where it will run, without a CPU copy."""
    cls_name, args = configs[name]
    model = build_model({"name": cls_name, "args": args}, "meta").to_empty(device=device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" in pname or "gamma" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
        if hasattr(model, "compute_buffers"):
            model.compute_buffers()
    return model.eval()


def random_conditioner(device: torch.device | str) -> nn.Module:
    """DINOv3 ViT-L/16 with 4 registers (the reference's image encoder) with random weights."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from backend.trellis2.image_cond import DinoV3Conditioner

    config = DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             num_register_tokens=4, patch_size=16, layerscale_value=1e-5)
    with torch.device(device):  # initialised where it runs: no slow CPU init and copy
        dino = DINOv3ViTModel(config)
    return DinoV3Conditioner(dino).to(device)


def random_pipeline(models: dict[str, nn.Module], conditioner: nn.Module, device: torch.device,
                    offload: bool) -> Trellis2Pipeline:
    """A pipeline of the given models with pipeline.json's samplers; offload=True moves the models to host memory."""
    gen = torch.Generator().manual_seed(0)
    latent = models["shape_slat_flow_model_512"].out_channels
    norm = {"mean": (torch.randn(latent, generator=gen) * 0.5).tolist(), "std": [5.0] * latent}
    # The reference's grids, scaled to the models' own size (1 at full size; tests use quarter-size models).
    grid_scale = models["sparse_structure_flow_model"].resolution / STRUCTURE_GRID
    config = {"args": {**{k: {"params": v} for k, v in SAMPLERS.items()}, "shape_slat_normalization": norm,
                       "tex_slat_normalization": norm, "default_pipeline_type": "1024_cascade",
                       "grid_scale": grid_scale}}
    return Trellis2Pipeline(config, ModelStore(models, device, offload), conditioner, remover=None)


def calibrate(models: dict[str, nn.Module], device: torch.device) -> dict[str, Any]:
    """Shift the random decoders' biases so that token counts look like a real object's (OCCUPANCY, SUBDIVIDE)."""
    with torch.inference_mode():
        flow, dec = models["sparse_structure_flow_model"], models["sparse_structure_decoder"].to(device)
        r = flow.resolution
        z = torch.randn(1, flow.in_channels, r, r, r, device=device)
        logits = dec(z).flatten().float()
        dec.out_layer[2].bias -= torch.quantile(logits[::7], 1 - OCCUPANCY)
        coords = torch.argwhere(torch.nn.functional.max_pool3d((dec(z) > 0).float(), 2, 2, 0) > 0.5)[:, [0, 2, 3, 4]]
        shape_dec = models["shape_slat_decoder"].to(device)
        lr = SparseTensor(torch.randn(coords.shape[0], shape_dec.from_latent.in_features, device=device), coords.int())
        for level in range(4):
            up = shape_dec.blocks[level][-1]
            seen = []
            hook = up.to_subdiv.register_forward_hook(lambda _m, _i, out: seen.append(out.float()))
            shape_dec.upsample(lr, upsample_times=level + 1)
            hook.remove()
            up.to_subdiv.bias -= torch.quantile(seen[-1].flatten()[::3], 1 - SUBDIVIDE).to(up.to_subdiv.bias.dtype)
    return {"lr_tokens_calibration": int(coords.shape[0])}
