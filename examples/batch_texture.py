"""Batch: texture every mesh of a folder from the image of the same name (chair.obj + chair.png), all in one .blend.

    blender -b --python examples/batch_texture.py -- FOLDER -o OUT.blend [--glb-dir DIR] [--seed N]
                                                   [--resolution 512|1024|1536] [--texture-size N] [--spacing M]

Meshes: .obj, .ply, .stl, .glb, .gltf, .fbx, .usd/.usda/.usdc (the parts of one file become one object); images:
those batch_folder.py reads. Needs the TRELLIS.2 extension installed and enabled in that Blender, with its backend
set in the add-on's preferences (`--server tcp://HOST:PORT` here overrides that for this run); see batch_folder.py.

Under `blender -b` the add-on's operator runs synchronously: each call returns when the object is textured (a new
material; its geometry and UV maps stay, a UV map is made when it has none). Progress lines are printed as the
backend reports them. A mesh that fails, or has no image, is reported and skipped; the exit status is 1 if any did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_folder import IMAGE_SUFFIXES, export_glb, save, trellis2_preferences  # noqa: E402  (its sibling)

IMPORTERS = {".obj": "wm.obj_import", ".ply": "wm.ply_import", ".stl": "wm.stl_import", ".glb": "import_scene.gltf",
             ".gltf": "import_scene.gltf", ".fbx": "import_scene.fbx", ".usd": "wm.usd_import",
             ".usda": "wm.usd_import", ".usdc": "wm.usd_import"}


def parse_args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(prog="blender -b --python batch_texture.py --",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .blend to write")
    parser.add_argument("--glb-dir", type=Path, help="also export each textured object as DIR/<mesh name>.glb")
    parser.add_argument("--seed", type=int, help="seed for every mesh (default: the add-on's default)")
    parser.add_argument("--resolution", type=int, help="voxel resolution of the texturing: 512, 1024 or 1536")
    parser.add_argument("--texture-size", type=int, help="width and height of the textures, e.g. 1024")
    parser.add_argument("--spacing", type=float, help="place the objects along X this far apart (default: as "
                                                      "imported)")
    parser.add_argument("--server", help="backend address, overriding the add-on's preferences for this run")
    return parser.parse_args(argv)


def pairs(folder: Path) -> list[tuple[Path, Path | None]]:
    """Each mesh file of the folder with the image of the same name (None when there is none), by name."""
    images = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    meshes = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMPORTERS)
    return [(mesh, images.get(mesh.stem)) for mesh in meshes]


def import_mesh(path: Path) -> bpy.types.Object:
    """The file's meshes as one object named after the file; RuntimeError if it holds none."""
    before = set(bpy.data.objects)
    module, name = IMPORTERS[path.suffix.lower()].split(".")
    getattr(getattr(bpy.ops, module), name)(filepath=str(path.absolute()))
    meshes = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    if not meshes:
        raise RuntimeError(f"{path.name} holds no mesh")
    if len(meshes) > 1:  # one texturing job for the whole model
        with bpy.context.temp_override(active_object=meshes[0], selected_objects=meshes,
                                       selected_editable_objects=meshes):
            bpy.ops.object.join()
    obj = meshes[0]
    obj.name = path.stem
    return obj


def main() -> int:
    args = parse_args()
    prefs = trellis2_preferences()
    if args.server:
        prefs.backend_mode, prefs.server_address = "REMOTE", args.server
    todo = pairs(args.folder)
    if not todo:
        sys.exit(f"error: no meshes ({', '.join(sorted(IMPORTERS))}) in {args.folder}")
    settings = {} if args.seed is None else {"seed": args.seed}
    for name in ("resolution", "texture_size"):  # settings with number choices are strings in Blender
        if getattr(args, name) is not None:
            settings[name] = str(getattr(args, name))
    failed = []
    for i, (mesh, image) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {mesh.name}" + (f" + {image.name}" if image else ""), flush=True)
        try:
            if image is None:
                raise RuntimeError(f"no image named {mesh.stem} ({', '.join(sorted(IMAGE_SUFFIXES))}) beside it")
            obj = import_mesh(mesh)
            if args.spacing is not None:
                obj.location = (i * args.spacing, 0.0, 0.0)
            bpy.ops.trellis2.texture(object_name=obj.name, image_path=str(image.absolute()), **settings)
        except (RuntimeError, TypeError) as exc:  # the add-on's report, ours, or a setting value it does not offer
            print(f"  failed: {str(exc).removeprefix('Error: ').strip()}", flush=True)
            failed.append(mesh.name)
            continue
        if args.glb_dir:
            for other in bpy.context.view_layer.objects:
                other.select_set(other == obj)
            export_glb(args.glb_dir, mesh.stem)
    return save(args.output, f"{len(todo) - len(failed)} of {len(todo)} meshes textured", failed)


if __name__ == "__main__":
    sys.exit(main())
