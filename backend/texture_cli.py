"""`python -m backend texture MESH IMAGE -o OUT.glb`: texture an existing mesh from an image, in this process.

The mesh (GLB/glTF/OBJ/PLY and whatever else trimesh reads; every part, node transforms applied) is textured by
the texturing pipeline (backend.trellis2.texturing) and baked onto its own triangles (backend.asset.bake_onto):
its UVs are kept when usable, else a new atlas is made. The GLB written holds the same vertices (positions bit for
bit, in the file's own frame) and faces with the new material; only UV seams of a new atlas add vertex copies.
The progress line and Ctrl-C cancel are the `generate` command's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from backend.asset.textured_mesh import AssetSettings
from backend.errors import InvalidInput, JobFailure
from backend.generate_cli import ProgressLine, load_pipeline, run_reported
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.user_mesh import UserMesh
from backend.ovoxel_cli import CliError, load_mesh_parts, up_axis
from protocol import InvalidSettings
from protocol.settings import DEFAULT_WEIGHTS, SETTINGS, TEXTURE
from protocol.settings_cli import add_setting_arguments, given_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("texture", help="mesh + image in, the mesh with PBR textures (GLB) out, in this process")
    p.add_argument("mesh", type=Path, metavar="MESH", help="the mesh to texture: .glb, .gltf, .obj, .ply, ...")
    p.add_argument("image", type=Path, metavar="IMAGE_OR_NPZ",
                   help="the reference image; or a texturing result .npz written earlier, to bake it again onto MESH "
                        "with other texture settings (no pipeline, no GPU needed)")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.glb|OUT.npz",
                   help="the textured GLB (default: MESH with .textured.glb), or .npz to keep the texturing result")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="hub repo id or local folder with texturing_pipeline.json")
    p.add_argument("--up", choices=("auto", "y", "z"), default="auto",
                   help="the mesh file's up axis; auto: y for .glb/.gltf/.obj, z otherwise")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--memory", choices=["auto", "gpu", "offload"], default="auto",
                   help="keep all models on the GPU, move each in for its stage, or decide from free memory")
    p.add_argument("--rembg", metavar="SESSION_OR_ONNX",
                   help="background remover for images without alpha (default birefnet-general, MIT)")
    add_setting_arguments(p, TEXTURE, title="texturing settings")
    p.set_defaults(run=run_texture)


def load_user_mesh(path: Path, up: str) -> UserMesh:
    """Every part of a mesh file as one mesh in the Z-up frame, with its UVs when every part has them."""
    parts = load_mesh_parts(path, up)
    offsets = np.cumsum([0] + [len(part.vertices) for part in parts])
    positions = np.concatenate([part.vertices for part in parts])
    faces = np.concatenate([np.asarray(part.faces) + offset for part, offset in zip(parts, offsets)])
    uvs = None
    if all(part.uvs is not None for part in parts):
        uvs = np.concatenate([part.uvs for part in parts])
    return UserMesh.checked(positions, faces, uvs)


def run_texture(args: argparse.Namespace) -> int:
    from backend.asset.bake_onto import bake_onto, textured_mesh
    from backend.asset.glb import write_glb
    from backend.trellis2.texturing import TexturingPipeline

    output = args.output or args.mesh.with_suffix(".textured.glb")
    if output.suffix.lower() not in (".glb", ".npz"):
        print(f"error: the output must be a .glb (or .npz) file, got {output}", file=sys.stderr)
        return 2
    rebake = args.image.suffix.lower() == ".npz"
    if not args.image.is_file():
        print(f"error: image {args.image} not found", file=sys.stderr)
        return 2
    given = given_settings(args, TEXTURE)
    try:
        asset = AssetSettings.from_settings(SETTINGS.resolve(TEXTURE, given))
        mesh = load_user_mesh(args.mesh, up_axis(args.mesh, args.up))
    except (InvalidSettings, JobFailure) as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2
    except (ValueError, CliError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = ProgressLine(sys.stderr)

    def work() -> int:
        if rebake:
            try:
                voxels = OVoxel.load(args.image)
            except ValueError as exc:
                raise InvalidInput(str(exc), "give a .npz that `texture MESH IMAGE -o X.npz` wrote") from exc
            if voxels.metadata.get("kind") != "texturing":
                raise InvalidInput(f"{args.image} is not a texturing result",
                                   "write one with `texture MESH IMAGE -o X.npz`")
        else:
            pipeline = load_pipeline(TexturingPipeline, args, progress)
            voxels = pipeline.texture(mesh, args.image, pipeline.settings(given), progress)
        if output.suffix.lower() == ".npz":
            voxels.save(output)
            progress.done(f"wrote the texturing result {output}; bake it with `texture {args.mesh} {output}`")
            return 0
        baked = bake_onto(mesh, voxels, asset, progress)
        write_glb(textured_mesh(mesh, baked), output)
        progress.done(f"wrote {output}: {len(mesh.faces)} faces, {asset.texture_size}^2 textures, "
                      f"UVs {baked.metadata['uvs']}, in {progress.elapsed():.1f}s")
        return 0

    return run_reported(work, progress)
