"""GPU benchmark at full 4B size with random weights (no real checkpoint is needed).

1. Each flow model (SS, shape, texture) built at full size in bf16: forward time and peak memory at 4096 and
   16384 tokens (the SS flow always has 4096), and a GPU-vs-CPU check of one full-size block on a small input.
2. The whole `1024_cascade` pipeline from an RGBA image to an O-Voxel, with per-stage wall time and peak memory,
   then the asset step (500k faces, 2048² textures) and GLB encoding: image in, GLB bytes out.
   Random networks have no idea what an object looks like, so the structure decoder's output bias and the shape
   decoder's subdivision biases are calibrated to give realistic token counts (a few percent occupancy, about
   four children per subdivided voxel); the counts reached are printed with the timings.

Run on the GPU machine: `python benchmarks/gpu_full_size.py --out results.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.trellis2.checkpoint import build_model
from backend.trellis2.pipeline import ModelStore, Trellis2Pipeline
from backend.trellis2.sampler import SamplerParams
from backend.trellis2.sparse import SparseTensor

FLOW = {"model_channels": 1536, "cond_channels": 1024, "num_blocks": 30, "num_heads": 12, "mlp_ratio": 5.3334,
        "pe_mode": "rope", "share_mod": True, "initialization": "scaled", "qk_rms_norm": True,
        "qk_rms_norm_cross": True, "dtype": "bfloat16"}
DEC = {"model_channels": [1024, 512, 256, 128, 64], "latent_channels": 32, "num_blocks": [4, 16, 8, 4, 0],
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
    "shape_slat_decoder": ("FlexiDualGridVaeDecoder", {**DEC, "resolution": 256}),
    "tex_slat_flow_model_1024": ("SLatFlowModel", {**FLOW, "resolution": 64, "in_channels": 64, "out_channels": 32}),
    "tex_slat_decoder": ("SparseUnetVaeDecoder", {**DEC, "out_channels": 6, "pred_subdiv": False}),
}
SAMPLERS = {  # pipeline.json params (spec §1.2)
    "sparse_structure_sampler": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7,
                                 "guidance_interval": [0.6, 1.0], "rescale_t": 5.0},
    "shape_slat_sampler": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.5,
                           "guidance_interval": [0.6, 1.0], "rescale_t": 3.0},
    "tex_slat_sampler": {"steps": 12, "guidance_strength": 1.0, "guidance_rescale": 0.0,
                         "guidance_interval": [0.6, 0.9], "rescale_t": 3.0},
}
OCCUPANCY = 0.008  # fraction of the 64³ structure grid occupied (~2k LR tokens, ~10k HR: a real asset's count)
SUBDIVIDE = 0.5  # fraction of children kept per subdivided voxel (4 of 8)


def random_model(name: str, device: torch.device) -> torch.nn.Module:
    """Full-size model with N(0, 1/fan_in) weights (the goldens' randomisation), built without a CPU copy."""
    cls_name, args = MODELS[name]
    model = build_model({"name": cls_name, "args": args}, "meta").to_empty(device=device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0, fan_in**-0.5)
            elif "norm" in pname or "gamma" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
        if hasattr(model, "compute_buffers"):
            model.compute_buffers()
    return model.eval()


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def bench_flows(device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for name in ("sparse_structure_flow_model", "shape_slat_flow_model_1024", "tex_slat_flow_model_1024"):
        model = random_model(name, device)
        for tokens in ((4096,) if name.startswith("sparse") else (4096, 16384)):
            cond = torch.randn(1, 4101 if tokens > 4096 else 1029, 1024, device=device)
            t = torch.tensor([500.0], device=device)
            if name.startswith("sparse"):
                x_in, kwargs = torch.randn(1, 8, 16, 16, 16, device=device), {}
            else:
                coords = torch.randint(0, 64, (tokens * 2, 3), device=device).unique(dim=0)[:tokens]
                coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).int()
                x_in = SparseTensor(torch.randn(tokens, 32, device=device), coords)
                kwargs = {"concat_cond": x_in} if "tex" in name else {}
            with torch.inference_mode():
                for _ in range(2):
                    model(x_in, t, cond, **kwargs)
                torch.cuda.reset_peak_memory_stats()
                start = sync_time()
                for _ in range(5):
                    model(x_in, t, cond, **kwargs)
                ms = (sync_time() - start) / 5 * 1e3
            rows.append({"model": name, "tokens": tokens, "cond_tokens": cond.shape[1], "ms_per_forward": ms,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
            print(rows[-1], flush=True)
        if name == "shape_slat_flow_model_1024":
            rows.append(gpu_vs_cpu_block(model))
        del model
        torch.cuda.empty_cache()
    return rows


def gpu_vs_cpu_block(model: torch.nn.Module) -> dict[str, Any]:
    """One full-size bf16 block on 300 tokens: GPU (SDPA kernels) against our CPU path."""
    block = model.blocks[0]
    x = torch.randn(300, 1536)
    with torch.inference_mode():
        gpu = _run_block(block, x.cuda()).float().cpu()
        cpu_block = block.to("cpu")
        cpu = _run_block(cpu_block, x).float()
        block.to("cuda")
    rel = ((gpu - cpu).norm() / cpu.norm()).item()
    row = {"check": "full-size bf16 block, GPU vs CPU", "rel_l2": rel, "max_abs": (gpu - cpu).abs().max().item()}
    print(row, flush=True)
    return row


def _run_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from backend.trellis2.transformer import Packing, rope_phases

    coords = torch.stack(torch.meshgrid(*[torch.arange(7)] * 3, indexing="ij"), -1).reshape(-1, 3)[:300].to(x.device)
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 64, 1024, generator=gen).to(x.device, torch.bfloat16)
    mod = (torch.randn(1, 6 * 1536, generator=gen) * 0.1).to(x.device, torch.bfloat16)
    phases = rope_phases(coords, 128)
    packing = Packing([300], x.device)
    return block(x.to(torch.bfloat16), mod, cond, packing, phases)


def calibrate(models: dict[str, torch.nn.Module], cond: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Set the random decoders' biases so that token counts look like a real object's."""
    with torch.inference_mode():
        z = torch.randn(1, 8, 16, 16, 16, device=device)
        dec = models["sparse_structure_decoder"]
        logits = dec(z).flatten().float()
        dec.out_layer[2].bias -= torch.quantile(logits[::7], 1 - OCCUPANCY)
        coords = torch.argwhere(torch.nn.functional.max_pool3d((dec(z) > 0).float(), 2, 2, 0) > 0.5)[:, [0, 2, 3, 4]]
        lr = SparseTensor(torch.randn(coords.shape[0], 32, device=device), coords.int())
        shape_dec = models["shape_slat_decoder"]
        for level in range(4):
            up = shape_dec.blocks[level][-1]
            seen = []
            hook = up.to_subdiv.register_forward_hook(lambda _m, _i, out: seen.append(out.float()))
            shape_dec.upsample(lr, upsample_times=level + 1)
            hook.remove()
            up.to_subdiv.bias -= torch.quantile(seen[-1].flatten()[::3], 1 - SUBDIVIDE).to(up.to_subdiv.bias.dtype)
    return {"lr_tokens_calibration": int(coords.shape[0])}


def random_pipeline(device: torch.device) -> tuple[Trellis2Pipeline, dict[str, Any]]:
    """The whole pipeline at full size with calibrated random weights (seeded: every call builds the same one), and
    the calibration's token count."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from backend.trellis2.image_cond import DinoV3Conditioner

    torch.manual_seed(0)
    models = {name: random_model(name, device) for name in MODELS}
    dino = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, num_register_tokens=4, patch_size=16,
                                          layerscale_value=1e-5))
    conditioner = DinoV3Conditioner(dino).to(device)
    calibration = calibrate(models, torch.zeros(1, 1029, 1024, device=device), device)
    gen = torch.Generator().manual_seed(0)
    norm = {"mean": (torch.randn(32, generator=gen) * 0.5).tolist(), "std": [5.0] * 32}
    config = {"args": {**{k: {"params": v} for k, v in SAMPLERS.items()}, "shape_slat_normalization": norm,
                       "tex_slat_normalization": norm, "default_pipeline_type": "1024_cascade"}}
    store = ModelStore(models, device, offload=False)
    return Trellis2Pipeline(config, store, conditioner, remover=None), calibration


def disc_image() -> Image.Image:
    """A 768² RGBA image of an orange disc on transparency: the benchmarks' input (its alpha is the mask)."""
    rgba = np.zeros((768, 768, 4), np.uint8)
    yy, xx = np.mgrid[:768, :768]
    inside = (yy - 384) ** 2 + (xx - 384) ** 2 < 300**2
    rgba[inside] = (180, 120, 60, 255)
    return Image.fromarray(rgba, "RGBA")


def bench_pipeline(device: torch.device) -> dict[str, Any]:
    pipe, calibration = random_pipeline(device)
    image = disc_image()

    timeline: list[tuple[str, float, float]] = []

    def progress(stage: str, step: int, total: int) -> None:
        timeline.append((stage, sync_time(), torch.cuda.max_memory_allocated() / 2**30))

    from backend.asset.glb import glb_bytes
    from backend.asset.postprocess import build_textured_mesh
    from backend.asset.textured_mesh import AssetSettings
    from backend.trellis2.pipeline import GenerationSettings

    results = []
    for run in range(2):  # the first run includes one-time CUDA/cuDNN initialisation
        timeline.clear()
        torch.cuda.reset_peak_memory_stats()
        start = sync_time()
        ovoxel = pipe.run(image, GenerationSettings(pipeline_type="1024_cascade", seed=1), progress)
        total = sync_time() - start
        stages: dict[str, dict[str, float]] = {}
        previous = start
        for stage, stamp, peak in timeline:
            entry = stages.setdefault(stage, {"seconds": 0.0, "peak_gib": 0.0})
            entry["seconds"] += stamp - previous
            entry["peak_gib"] = max(entry["peak_gib"], peak)
            previous = stamp
        asset_start = sync_time()
        mesh = build_textured_mesh(ovoxel, AssetSettings(faces=500_000, texture_size=2048), device=device)
        glb = glb_bytes(mesh)
        asset_seconds = sync_time() - asset_start
        results.append({"run": run, "total_seconds": total, "stages": stages,
                        "asset_seconds": asset_seconds, "asset_stages": mesh.metadata.get("timings"),
                        "image_to_glb_seconds": total + asset_seconds, "glb_mib": len(glb) / 2**20,
                        "final_faces": int(mesh.indices.shape[0]),
                        "hr_tokens": ovoxel.metadata["tokens"], "voxels": int(ovoxel.coords.shape[0]),
                        "faces": int(ovoxel.faces.shape[0]), "resolution": ovoxel.resolution,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(results[-1], indent=1), flush=True)
    return {"calibration": calibration, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_full_size.json")
    parser.add_argument("--skip-flows", action="store_true", help="only the whole-pipeline benchmark")
    args = parser.parse_args()
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_flows:
        report["flows"] = bench_flows(device)
    torch.cuda.empty_cache()
    report["pipeline"] = bench_pipeline(device)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
