"""Mesh quality of encode -> decode on procedural models of the kinds issue 12 names (not a test; slow).

`python benchmarks/quality_asset.py [--resolution 256] [--faces 500000 20000] [--texture-size 1024] [--device cpu]
[--remesh] [--only NAME ...] [--out out/quality.json]`: each source (closed blob, open sheet, many touching parts
with their own untextured colours, thin fin on a body) is encoded at the resolution (backend.ovoxel.encode), built
by build_textured_mesh at each face target, welded by position, and measured: non-manifold edges, boundary loops,
inconsistent edges, double-sided flag, faces against the target, flipped-face and sliver fractions, Chamfer in
voxels against the source, colour error of the untextured parts (in 1/255), and the build time per stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "asset"))
from asset_shapes import bumpy_ball, engine, fin_body, sheet  # noqa: E402
from mesh_quality import as_dict, chamfer, flipped_fraction, sliver_fraction, topology, weld  # noqa: E402

from backend.asset.postprocess import build_textured_mesh  # noqa: E402
from backend.asset.textured_mesh import AssetSettings  # noqa: E402
from backend.ovoxel.encode import Material, SurfaceMesh, encode_mesh, linear_to_srgb  # noqa: E402


def sources() -> dict[str, tuple[list[SurfaceMesh], bool]]:
    """name -> (parts, whether the source is closed)."""
    v, f = sheet(120)
    parts, colours = engine()
    return {
        "closed_blob": ([SurfaceMesh(*(t.numpy() for t in bumpy_ball()))], True),
        "open_sheet": ([SurfaceMesh(v.double().numpy(), f.long().numpy())], False),
        "many_parts": ([SurfaceMesh(pv.numpy(), pf.numpy(), material=Material(base_color=c))
                        for (pv, pf), c in zip(parts, colours)], True),
        "thin_fin": ([SurfaceMesh(*(t.numpy() for t in fin_body()))], True),
    }


def colour_error(mesh, parts: list[SurfaceMesh], voxel: float) -> dict[str, float]:
    """|baked sRGB - sRGB(part colour)| in 1/255 at output vertices at least 1.5 voxels from any other part."""
    t = mesh.base_color.shape[0]
    col = np.clip((mesh.uvs[:, 0] * t).astype(int), 0, t - 1)
    row = np.clip(((1 - mesh.uvs[:, 1]) * t).astype(int), 0, t - 1)
    got = mesh.base_color[row, col, :3].astype(np.float64)
    from backend.ovoxel.nearest import closest_points

    p = torch.from_numpy(mesh.positions.astype(np.float64))
    dist = torch.stack([closest_points(torch.from_numpy(part.vertices), torch.from_numpy(part.faces).long(), p,
                                       radius=0.01).distance for part in parts], 1)
    nearest = dist.argmin(dim=1)
    order = dist.sort(dim=1).values
    clear = (order[:, 1] - order[:, 0] > 1.5 * voxel).numpy()
    want = 255 * linear_to_srgb(np.array([part.material.base_color[:3] for part in parts]))[nearest.numpy()]
    err = np.abs(got - want).max(axis=1)[clear]
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
            "p99": float(np.percentile(err, 99)), "vertices": int(clear.sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--faces", type=int, nargs="+", default=[500_000, 20_000])
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--remesh", action="store_true", help="build with the narrow-band remesh")
    ap.add_argument("--out", type=Path, default=Path("out/quality.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"resolution": args.resolution, "texture_size": args.texture_size, "device": args.device,
                     "remesh": args.remesh}
    h = 1.0 / args.resolution
    for name, (parts, closed) in sources().items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        ov = encode_mesh(parts, args.resolution)
        entry: dict = {"encode_s": round(time.perf_counter() - start, 2), "dual_grid_faces": int(len(ov.faces)),
                       "source_closed": closed}
        src_v = torch.from_numpy(np.concatenate([p.vertices for p in parts]).astype(np.float64))
        offsets = np.cumsum([0] + [len(p.vertices) for p in parts])[:-1]
        src_f = torch.from_numpy(np.concatenate([p.faces + o for p, o in zip(parts, offsets)]).astype(np.int64))
        raw = weld(ov.vertices, ov.faces.astype(np.int64))
        entry["raw"] = as_dict(topology(*raw))
        for target in args.faces:
            start = time.perf_counter()
            settings = AssetSettings(faces=target, texture_size=args.texture_size, remesh=args.remesh)
            mesh = build_textured_mesh(ov, settings, device=args.device)
            wall = time.perf_counter() - start
            out = weld(mesh.positions, mesh.indices.astype(np.int64))
            run = {"wall_s": round(wall, 2), "stages_s": {k: round(v, 3) for k, v in mesh.metadata["timings"].items()},
                   "faces": int(len(mesh.indices)), "target": target, "double_sided": mesh.double_sided,
                   **as_dict(topology(*out)),
                   "flipped": round(flipped_fraction(out, (src_v, src_f)), 5),
                   "slivers": round(sliver_fraction(*out), 5),
                   "chamfer_voxels": round(chamfer((src_v, src_f), out) / h, 5)}
            if name == "many_parts":
                run["colour_error_255"] = colour_error(mesh, parts, h)
            entry[f"faces_{target}"] = run
            print(name, target, run, flush=True)
        results[name] = entry
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
