"""GPU benchmark of the texturing pipeline (issue 17): texture a ~200k-face mesh at resolution 1024 with 2048²
textures, per stage, with peak memory; random full-size weights (the texture flow and decoder of backend.bench,
the shape encoder of texturing.md §1.1), so the timings are the real networks' and the textures are noise.

Run on a CUDA machine from the repository root: `python benchmarks/bench_texturing.py [--faces 200000]
[--resolution 1024] [--texture-size 2048] [--runs 2] [--json OUT.json]`. Target: ≤ 4 s on one H200.
Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.asset.bake_onto import bake_onto  # noqa: E402
from backend.asset.textured_mesh import AssetSettings  # noqa: E402
from backend.bench.full_size import MODELS, SAMPLERS, TEXTURING_ONLY, random_conditioner, random_model  # noqa: E402
from backend.bench.run import disc_image, environment  # noqa: E402
from backend.ovoxel.user_mesh import UserMesh  # noqa: E402
from backend.trellis2.pipeline import ModelStore  # noqa: E402
from backend.trellis2.pipeline_types import TEXTURING_MODELS  # noqa: E402
from backend.trellis2.texturing import TexturingPipeline  # noqa: E402

CONFIGS = {**MODELS, **TEXTURING_ONLY}


def bumpy_mesh(faces: int) -> UserMesh:
    """An organic closed surface of about `faces` triangles (a sphere pushed around by a few waves), UV-less."""
    side = max(8, int(round((faces / 4) ** 0.5)))
    sphere = trimesh.creation.uv_sphere(count=[side, side])
    v = np.asarray(sphere.vertices, dtype=np.float64)
    bumps = 1 + 0.15 * np.sin(7 * v[:, 0]) * np.cos(5 * v[:, 1]) + 0.08 * np.sin(13 * v[:, 2])
    return UserMesh.checked((v * bumps[:, None] * [1.0, 0.8, 1.3]).astype(np.float32), np.asarray(sphere.faces))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=200_000)
    parser.add_argument("--resolution", type=int, default=1024, choices=(512, 1024, 1536))
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=2, help="the last is reported (the first pays warm-up)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    models = {name: random_model(name, device, CONFIGS) for name in TEXTURING_MODELS}
    gen = torch.Generator().manual_seed(0)
    norm = {"mean": (torch.randn(32, generator=gen) * 0.5).tolist(), "std": [5.0] * 32}
    config = {"args": {"tex_slat_sampler": {"params": SAMPLERS["tex_slat_sampler"]}, "models": {},
                       "shape_slat_normalization": norm, "tex_slat_normalization": norm}}
    pipe = TexturingPipeline(config, ModelStore(models, device, offload=False), random_conditioner(device), None)
    mesh = bumpy_mesh(args.faces)
    settings = pipe.settings({"resolution": args.resolution, "remove_background": False})
    asset = AssetSettings(texture_size=args.texture_size)
    image = disc_image()
    print(" | ".join(f"{k} {v}" for k, v in environment(device).items()), flush=True)
    print(f"mesh: {len(mesh.faces)} faces, {len(mesh.positions)} vertices; resolution {args.resolution}, "
          f"textures {args.texture_size}²", flush=True)
    rows = []
    for run in range(args.runs):
        stamps: dict[str, float] = {}
        peaks: dict[str, float] = {}
        last = [time.perf_counter()]

        def progress(stage: str, step: int, total: int) -> None:
            if step == 0:
                torch.cuda.synchronize()
                last[0] = time.perf_counter()
                torch.cuda.reset_peak_memory_stats()
            elif total and step >= total:
                torch.cuda.synchronize()
                stamps[stage] = stamps.get(stage, 0.0) + time.perf_counter() - last[0]
                peaks[stage] = max(peaks.get(stage, 0.0), torch.cuda.max_memory_allocated() / 2**30)

        torch.cuda.synchronize()
        start = time.perf_counter()
        voxels = pipe.texture(mesh, image, settings, progress)
        baked = bake_onto(mesh, voxels, asset, progress, device=device)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        row = {"run": run, "seconds": total, "stages": stamps, "stage_peak_gib": peaks, "voxels": int(len(voxels.coords)),
               "tokens": int(voxels.metadata["tokens"]), "uvs": baked.metadata["uvs"], "charts": baked.metadata["charts"]}
        rows.append(row)
        print(f"run {run}: {total:.2f} s | " + " | ".join(f"{k} {v:.2f}s/{peaks[k]:.1f}GiB" for k, v in stamps.items())
              + f" | {row['voxels']} voxels, {row['tokens']} tokens", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(device), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
