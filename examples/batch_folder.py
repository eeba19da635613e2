"""Batch: turn every image of a folder into a textured object, all in one saved .blend (and optionally one GLB each).

    blender -b --python examples/batch_folder.py -- FOLDER -o OUT.blend [--glb-dir DIR] [--seed N] [--spacing M]

Needs the TRELLIS.2 extension installed and enabled in that Blender (Edit > Preferences > Get Extensions >
Install from Disk, the zip from `python build_addon.py`), with its backend set in the add-on's preferences (a local
backend needs the backend Python; `--server tcp://HOST:PORT` here overrides that for this run).

Under `blender -b` the add-on's operator runs synchronously: each call returns when the object exists, which is
then the selected, active object. Progress lines are printed as the backend reports them. An image that fails is
reported and skipped; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bpy

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def parse_args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(prog="blender -b --python batch_folder.py --", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .blend to write")
    parser.add_argument("--glb-dir", type=Path, help="also export each object as DIR/<image name>.glb")
    parser.add_argument("--seed", type=int, help="seed for every image (default: the add-on's default)")
    parser.add_argument("--spacing", type=float, default=1.5, help="distance between objects along X (default 1.5)")
    parser.add_argument("--server", help="backend address, overriding the add-on's preferences for this run")
    return parser.parse_args(argv)


def trellis2_preferences():
    """The add-on's preferences, wherever it was installed (bl_ext.<repository>.trellis2)."""
    for name, addon in bpy.context.preferences.addons.items():
        if name.rpartition(".")[2] == "trellis2":
            return addon.preferences
    sys.exit("error: the TRELLIS.2 extension is not enabled in this Blender: install it from the zip built by "
             "`python build_addon.py` (Preferences > Get Extensions > Install from Disk) and enable it")


def export_glb(glb_dir: Path, name: str) -> None:
    """The selected objects as glb_dir/<name>.glb."""
    glb_dir.mkdir(parents=True, exist_ok=True)
    glb = glb_dir / f"{name}.glb"
    bpy.ops.export_scene.gltf(filepath=str(glb.absolute()), export_format="GLB", use_selection=True)
    print(f"  wrote {glb}", flush=True)


def save(output: Path, done: str, failed: list[str]) -> int:
    """Write the .blend, say what was `done` and what `failed`; the exit status (1 if anything failed)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(output.absolute()), compress=True)
    print(f"wrote {output}: {done}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main() -> int:
    args = parse_args()
    prefs = trellis2_preferences()
    if args.server:
        prefs.backend_mode, prefs.server_address = "REMOTE", args.server
    images = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        sys.exit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.folder}")
    settings = {} if args.seed is None else {"seed": args.seed}
    failed = []
    for i, image in enumerate(images):
        print(f"[{i + 1}/{len(images)}] {image.name}", flush=True)
        bpy.context.scene.cursor.location = (i * args.spacing, 0.0, 0.0)
        try:
            bpy.ops.trellis2.generate(image_path=str(image.absolute()), **settings)
        except RuntimeError as exc:  # the add-on's error report: what happened and what to do
            print(f"  failed: {str(exc).removeprefix('Error: ')}", flush=True)
            failed.append(image.name)
            continue
        if args.glb_dir:
            export_glb(args.glb_dir, image.stem)  # the new object is the selected one
    return save(args.output, f"{len(images) - len(failed)} of {len(images)} images", failed)


if __name__ == "__main__":
    sys.exit(main())
