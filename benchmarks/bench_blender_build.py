"""How long the add-on's bpy builder takes for a million-triangle result (a benchmark, not a test).

`.venv-blender/bin/python benchmarks/bench_blender_build.py [--repeat 5]`: builds the extension with
build_addon.py, installs it into a private Blender user folder (as tests/blender does), and times
`blender.build.build_mesh` (numpy foreach_set of positions, loops, UVs, normals) on a synthetic 999,698-triangle
plane with 256² textures; prints each run and the median.
"""

from __future__ import annotations

import os
import tempfile

os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="trellis2-bench-user-")

import argparse  # noqa: E402
import importlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import bpy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "addon_core")]

import build_addon  # noqa: E402
import synthetic  # noqa: E402

PACKAGE = "bl_ext.user_default.trellis2"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    zip_path = build_addon.build(Path(tempfile.mkdtemp(prefix="trellis2-bench-dist-")))
    assert bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default",
                                                    enable_on_install=True) == {"FINISHED"}
    result = importlib.import_module(f"{PACKAGE}.core.result")
    build = importlib.import_module(f"{PACKAGE}.blender.build")
    mesh, textures = synthetic.plane_arrays(n=708, texture=256)
    data = result.mesh_data(mesh, textures, synthetic.metadata())
    seconds = []
    for run in range(args.repeat):
        started = time.perf_counter()
        me = build.build_mesh("big", data)
        seconds.append(time.perf_counter() - started)
        print(f"run {run}: {len(me.polygons):,} triangles in {seconds[-1]:.3f} s", flush=True)
        bpy.data.meshes.remove(me)
    print(f"median {statistics.median(seconds):.3f} s over {args.repeat} runs", flush=True)
    os._exit(0)  # bpy can crash at interpreter exit (shared/reference/blender.md, gotcha 1)


if __name__ == "__main__":
    main()
