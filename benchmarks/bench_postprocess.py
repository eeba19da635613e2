"""GPU benchmark of O-Voxel decode + post-process (asset issues #5 and #12), with a CPU-vs-GPU agreement check.

Run on a CUDA machine from the repository root: `python benchmarks/bench_postprocess.py [out_dir]`.
It builds a synthetic 1024^3 O-Voxel (bumpy sphere, torus and a small sphere, about 1.1M dual-grid faces),
then times `flexible_dual_grid_to_mesh` (the decode's mesh extraction) and `build_textured_mesh` per stage
(reference surface with the manifold repair, simplify, uv, bake, textures, normals) and its inner steps, with
peak GPU memory, for the web app's settings (500k faces, 2048^2; target <= 1.5 s on one H200) and variants.
Each run also reports the welded output's topology (non-manifold edges, boundary loops: 0 and 0 for these
closed shapes). Results go to out_dir/bench.json. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "asset"))  # the test shapes
from asset_shapes import dual_grid_inputs, pbr_pattern, sphere_sdf, torus_sdf, union, voxelize  # noqa: E402
from mesh_quality import as_dict, topology, weld  # noqa: E402

from backend.ovoxel.dual_grid import flexible_dual_grid_to_mesh  # noqa: E402
from backend.ovoxel.ovoxel import OVoxel  # noqa: E402
from backend.asset.postprocess import build_textured_mesh  # noqa: E402
from backend.asset.textured_mesh import AssetSettings, TexturedMesh  # noqa: E402

BIG_SHAPE = union(sphere_sdf((0.0, 0.0, 0.03), 0.11, bump=0.08, freq=45), torus_sdf((0.0, 0.0, -0.05), 0.16, 0.028),
                  sphere_sdf((0.14, 0.14, 0.14), 0.045, bump=0.1, freq=70))
SMALL_SHAPE = union(sphere_sdf((0.0, 0.0, 0.0), 0.3, bump=0.1, freq=12), torus_sdf((0.0, 0.0, 0.0), 0.33, 0.06))


SUBSTEPS: dict[str, float] = {}


def instrument() -> None:
    """Wrap the inner calls of the slow stages with GPU-synchronised timers (bench only)."""
    import backend.asset.bake as bake
    import backend.asset.postprocess as post
    import backend.asset.uv as uv

    def timed(module: object, name: str) -> None:
        fn = getattr(module, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            key = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            SUBSTEPS[key] = SUBSTEPS.get(key, 0.0) + time.perf_counter() - start
            return result
        setattr(module, name, wrapper)

    for module, name in [(bake, "rasterize"), (bake, "closest_points"), (uv, "cluster_charts"),
                         (uv, "pack_rectangles"), (post, "clean"), (post, "simplify"), (post, "unify_orientation"),
                         (post, "make_manifold"), (post, "orient_outward"), (post, "fill_small_holes"),
                         (post, "separate_coincident"), (post, "vertex_attributes"), (post, "smooth_normals"),
                         (post, "remesh_narrow_band")]:
        timed(module, name)


def log(*args: object) -> None:
    print(*args, flush=True)


def colour_error(mesh: TexturedMesh) -> dict[str, float]:
    """Base colour read at each vertex's UV against the pattern at the vertex (0..1 units)."""
    t = mesh.base_color.shape[0]
    col = np.clip((mesh.uvs[:, 0] * t).astype(int), 0, t - 1)
    row = np.clip(((1 - mesh.uvs[:, 1]) * t).astype(int), 0, t - 1)
    got = mesh.base_color[row, col, :3].astype(np.float64) / 255
    want = pbr_pattern(torch.from_numpy(mesh.positions)).numpy()[:, :3]
    err = np.abs(got - want)
    return {"mean": float(err.mean()), "p95": float(np.percentile(err, 95)), "p99": float(np.percentile(err, 99))}


def summary(mesh: TexturedMesh, wall: float, passes: int) -> dict:
    return {
        "wall_s": round(wall, 4),
        "stages_s": {k: round(v, 4) for k, v in mesh.metadata["timings"].items()},
        "peak_mem_gib": {k: round(v / 2**30, 3) for k, v in mesh.metadata.get("peak_memory", {}).items()},
        "faces": mesh.metadata["faces"], "vertices": int(mesh.positions.shape[0]), "charts": mesh.metadata["charts"],
        "uv_utilization": round(mesh.metadata["uv_utilization"], 4), "simplify_reports": passes,
        "alpha_mode": mesh.alpha_mode, "double_sided": mesh.double_sided, "colour_error": colour_error(mesh),
        "substeps_s": {k: round(v, 4) for k, v in SUBSTEPS.items()},
        "welded_topology": as_dict(topology(*weld(mesh.positions, mesh.indices.astype(np.int64)))),
    }


def timed_build(ovoxel: OVoxel, settings: AssetSettings, device: str) -> tuple[TexturedMesh, float, int]:
    reports: list[str] = []
    SUBSTEPS.clear()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    mesh = build_textured_mesh(ovoxel, settings, device=device, progress=lambda s, i, n: reports.append(s))
    if device == "cuda":
        torch.cuda.synchronize()
    return mesh, time.perf_counter() - start, reports.count("simplify")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
                     "device": torch.cuda.get_device_name(0), "cpu_threads": torch.get_num_threads()}
    log(results)
    budget_start = time.perf_counter()

    def save() -> None:
        (out / "bench.json").write_text(json.dumps(results, indent=1))

    # 1. CPU vs GPU on a small O-Voxel (also warms the GPU up).
    small = voxelize(SMALL_SHAPE, 64, lipschitz=1.5)
    settings = AssetSettings(faces=8000, texture_size=512)
    for device in ("cuda", "cpu", "cuda"):
        mesh, wall, passes = timed_build(small, settings, device)
        results[f"small_{device}"] = summary(mesh, wall, passes)
    log("small cpu", results["small_cpu"])
    log("small cuda", results["small_cuda"])
    save()

    # 2. The 1024^3 O-Voxel: decode-side mesh extraction, then the post-process at several settings.
    cells, dual, flags = dual_grid_inputs(BIG_SHAPE, 1024, lipschitz=2.0, device="cuda")
    decode = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        vertices, faces = flexible_dual_grid_to_mesh(cells, dual, flags, None, [[-0.5] * 3, [0.5] * 3], 1024)
        torch.cuda.synchronize()
        decode.append(time.perf_counter() - start)
    centre = (cells.float() + 0.5) / 1024 - 0.5
    big = OVoxel(cells.int().cpu().numpy(), pbr_pattern(centre).float().cpu().numpy(), 1024,
                 vertices.cpu().numpy(), faces.cpu().numpy())
    results["big_ovoxel"] = {"voxels": int(cells.shape[0]), "faces": int(faces.shape[0]),
                             "decode_mesh_s": [round(t, 4) for t in decode]}
    log("big ovoxel", results["big_ovoxel"])
    del cells, dual, flags, vertices, faces
    save()

    instrument()
    runs = [
        ("webapp_500k_2048", AssetSettings(faces=500_000, texture_size=2048), "cuda", 2),
        ("remesh_500k_2048", AssetSettings(faces=500_000, texture_size=2048, remesh=True), "cuda", 1),
        ("readme_1M_4096", AssetSettings(faces=1_000_000, texture_size=4096), "cuda", 1),
        ("reprocess_200k_1024", AssetSettings(faces=200_000, texture_size=1024), "cuda", 1),
        ("cpu_webapp_500k_2048", AssetSettings(faces=500_000, texture_size=2048), "cpu", 1),
    ]
    for name, settings, device, repeats in runs:
        if time.perf_counter() - budget_start > 300:
            results[name] = "skipped: time budget"
            continue
        for r in range(repeats):
            try:
                mesh, wall, passes = timed_build(big, settings, device)
                results[f"{name}_run{r}"] = summary(mesh, wall, passes)
            except Exception as exc:  # keep the other measurements
                results[f"{name}_run{r}"] = f"failed: {type(exc).__name__}: {exc}"
            log(name, r, results[f"{name}_run{r}"])
            save()
            torch.cuda.empty_cache()
    results["total_bench_s"] = round(time.perf_counter() - budget_start, 1)
    save()


if __name__ == "__main__":
    main()
