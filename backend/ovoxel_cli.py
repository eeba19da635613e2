"""`python -m backend ovoxel encode|decode`: a mesh file -> O-Voxel (.npz), and an O-Voxel -> textured GLB.

encode reads .obj/.ply/.glb/.gltf/.stl (and whatever else trimesh reads) with their materials, turns the file's
up axis into the O-Voxel's Z-up, fits the object into [-0.5, 0.5]^3 as the reference prepares its data, and
encodes it (backend.ovoxel.encode). decode runs the asset post-processing (backend.asset.postprocess) with the
same settings a generation job takes, and writes a GLB (backend.asset.glb).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.asset.textured_mesh import AssetSettings, TexturedMesh
from protocol import ProtocolError
from protocol.settings import REPROCESS, SETTINGS
from protocol.settings_cli import add_setting_arguments, given_settings

if TYPE_CHECKING:
    from backend.ovoxel.encode import Material, SurfaceMesh
    from backend.ovoxel.ovoxel import OVoxel

Y_UP_SUFFIXES = (".glb", ".gltf", ".obj")  # glTF is Y-up by definition; OBJ exporters default to Y-up
LINEAR_COLOR_SUFFIXES = (".glb", ".gltf")  # glTF vertex colours are linear; PLY/OBJ/OFF ones are sRGB-encoded


def up_axis(path: Path, choice: str) -> str:
    """The up axis of a mesh file: `choice` ("y" or "z"), or for "auto" the convention of its format."""
    return choice if choice != "auto" else ("y" if path.suffix.lower() in Y_UP_SUFFIXES else "z")


class CliError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ovoxel` command (with `encode` and `decode`) to a `python -m backend` subparser set."""
    parser = subparsers.add_parser("ovoxel", help="encode a mesh into an O-Voxel, or decode an O-Voxel into a GLB",
                                   description="Encode a mesh file into an O-Voxel (.npz), or decode an O-Voxel "
                                               "into a textured GLB.")
    actions = parser.add_subparsers(dest="ovoxel_action", required=True, metavar="ACTION")

    p = actions.add_parser("encode", help="mesh file -> O-Voxel .npz (flexible dual grid + PBR voxels)")
    p.add_argument("mesh", type=Path, metavar="MESH", help="input mesh: .obj, .ply, .glb, .gltf, .stl, ...")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="X.npz")
    p.add_argument("--resolution", type=int, default=256, metavar="R", help="grid resolution (default 256)")
    p.add_argument("--texture", type=Path, metavar="IMG",
                   help="base-colour texture for every part that has UVs (replaces the file's base colour)")
    p.add_argument("--up", choices=("auto", "y", "z"), default="auto",
                   help="the file's up axis; auto: y for .glb/.gltf/.obj, z otherwise")
    p.set_defaults(run=lambda args: _guarded(_encode, args))

    p = actions.add_parser("decode", help="O-Voxel .npz -> textured GLB (cleanup, simplify, UV unwrap, bake)")
    p.add_argument("ovoxel", type=Path, metavar="X.npz")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.glb")
    add_setting_arguments(p, REPROCESS, title="asset settings")
    p.add_argument("--device", default=None, help="torch device for post-processing (default: its own choice)")
    p.set_defaults(run=lambda args: _guarded(_decode, args))


def asset_settings(args: argparse.Namespace) -> AssetSettings:
    """AssetSettings from the settings flags a command added (`add_setting_arguments`); InvalidSettings names a bad
    one."""
    return AssetSettings.from_settings(SETTINGS.resolve(REPROCESS, given_settings(args, REPROCESS)))


def main(argv: list[str] | None = None) -> int:
    """Run `ovoxel ...` on its own (the backend CLI wires `register` in the same way)."""
    parser = argparse.ArgumentParser(prog="python -m backend")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.run(args)


def _guarded(command, args: argparse.Namespace) -> int:
    try:
        return command(args)
    except (CliError, ValueError, OSError, ProtocolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _progress(label: str):
    start = time.perf_counter()

    def report(stage: str, step: int, total: int) -> None:
        print(f"[{time.perf_counter() - start:7.2f}s] {label}: {stage} {step}/{total}", file=sys.stderr)

    return report


# ----------------------------------------------------------------------------------------------------------------
# encode


def _encode(args: argparse.Namespace) -> int:
    from backend.ovoxel.encode import encode_mesh, normalize_to_unit_cube

    if args.output.suffix.lower() != ".npz":
        raise CliError(f"the output must be a .npz file, got {args.output}")
    if not 8 <= args.resolution <= 2048:
        raise CliError(f"--resolution must be in [8, 2048], got {args.resolution}")
    up = up_axis(args.mesh, args.up)
    report = _progress("encode")
    report("load", 0, 1)
    parts = load_mesh_parts(args.mesh, up)
    if args.texture is not None:
        _apply_texture(parts, args.texture)
    report("load", 1, 1)

    sizes = [len(part.vertices) for part in parts]
    placed, center, scale = normalize_to_unit_cube(np.concatenate([part.vertices for part in parts]))
    for part, vertices in zip(parts, np.split(placed, np.cumsum(sizes)[:-1])):
        part.vertices = vertices
    metadata = {"source": args.mesh.name, "up_axis": up, "source_center": center.tolist(), "source_scale": scale}
    ovoxel = encode_mesh(parts, args.resolution, progress=report, metadata=metadata)
    ovoxel.save(args.output)
    print(f"wrote {args.output}: {len(ovoxel.coords)} voxels at {args.resolution}^3, dual-grid mesh "
          f"{len(ovoxel.faces)} faces, from {sum(len(p.faces) for p in parts)} input faces in {len(parts)} part(s)")
    return 0


def load_mesh_parts(path: Path, up: str) -> list[SurfaceMesh]:
    """The triangle meshes of a file (node transforms applied) as SurfaceMesh parts in a Z-up frame."""
    import trimesh

    from backend.ovoxel.encode import SurfaceMesh

    if not path.is_file():
        raise CliError(f"no such mesh file: {path}")
    try:
        scene = trimesh.load(str(path), force="scene")
    except Exception as exc:  # trimesh raises many types for unreadable files
        raise CliError(f"cannot read {path} as a mesh: {exc}") from exc
    parts = []
    for geometry in scene.dump():
        if not isinstance(geometry, trimesh.Trimesh) or len(geometry.faces) == 0:
            continue
        vertices = np.asarray(geometry.vertices, dtype=np.float64)
        if up == "y":
            vertices = np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)
        uvs, colors, material = _visual(geometry.visual, path.suffix.lower() in LINEAR_COLOR_SUFFIXES)
        parts.append(SurfaceMesh(vertices, np.asarray(geometry.faces), uvs=uvs, vertex_colors=colors,
                                 material=material))
    if not parts:
        raise CliError(f"{path} holds no triangles")
    return parts


def _visual(visual, linear_colors: bool) -> tuple[np.ndarray | None, np.ndarray | None, Material]:
    """(uvs, linear vertex colours, Material) from a trimesh visual; glTF semantics for PBR materials (factors
    linear, base-colour textures sRGB). `linear_colors`: the file's vertex colours are linear already."""
    from trimesh.visual.material import PBRMaterial, SimpleMaterial

    from backend.ovoxel.encode import Material, srgb_to_linear

    if visual.kind in ("vertex", "face"):
        colors = np.asarray(visual.vertex_colors, dtype=np.float64) / 255.0
        if not linear_colors:
            colors[:, :3] = srgb_to_linear(colors[:, :3])
        return None, colors, Material(alpha_mode="BLEND" if (colors[:, 3] < 1).any() else "OPAQUE")
    if visual.kind != "texture" or visual.material is None:
        return None, None, Material()
    uvs = None if visual.uv is None else np.asarray(visual.uv, dtype=np.float64)
    source = visual.material
    metallic_default = 1.0  # glTF's default when a PBR material leaves it out
    if isinstance(source, SimpleMaterial):
        # OBJ/MTL: no metalness; like Blender's importer, a diffuse map replaces Kd instead of being tinted by it.
        has_map = source.image is not None
        source, metallic_default = source.to_pbr(), 0.0
        if has_map:
            source.baseColorFactor = [255, 255, 255, 255]
    if not isinstance(source, PBRMaterial):
        return uvs, None, Material()
    factor = np.asarray(source.baseColorFactor if source.baseColorFactor is not None else [1.0] * 4, np.float64)
    if np.issubdtype(np.asarray(source.baseColorFactor).dtype, np.integer):
        factor = factor / 255.0
    textures = {}
    if uvs is not None:
        if source.baseColorTexture is not None:
            textures["base_color_texture"] = np.array(source.baseColorTexture.convert("RGBA"))
        if source.metallicRoughnessTexture is not None:
            textures["metallic_roughness_texture"] = np.array(source.metallicRoughnessTexture.convert("RGB"))
    return uvs, None, Material(
        base_color=tuple(float(x) for x in factor),
        metallic=metallic_default if source.metallicFactor is None else float(source.metallicFactor),
        roughness=1.0 if source.roughnessFactor is None else float(source.roughnessFactor),
        alpha_mode=source.alphaMode if source.alphaMode in ("OPAQUE", "MASK", "BLEND") else "OPAQUE",
        alpha_cutoff=0.5 if source.alphaCutoff is None else float(source.alphaCutoff),
        **textures,
    )


def _apply_texture(parts: list[SurfaceMesh], image_path: Path) -> None:
    from dataclasses import replace

    from PIL import Image, UnidentifiedImageError

    try:
        texture = np.array(Image.open(image_path).convert("RGBA"))
    except (OSError, UnidentifiedImageError) as exc:
        raise CliError(f"cannot read the texture {image_path}: {exc}") from exc
    with_uvs = [part for part in parts if part.uvs is not None]
    if not with_uvs:
        raise CliError("--texture needs UVs, and the mesh has none")
    if len(with_uvs) < len(parts):
        print(f"warning: {len(parts) - len(with_uvs)} part(s) without UVs keep their own colour", file=sys.stderr)
    opaque = bool((texture[..., 3] == 255).all())
    for part in with_uvs:
        part.material = replace(part.material, base_color=(1.0, 1.0, 1.0, 1.0), base_color_texture=texture,
                                alpha_mode="OPAQUE" if opaque else "BLEND")


# ----------------------------------------------------------------------------------------------------------------
# decode


def _decode(args: argparse.Namespace) -> int:
    from backend.asset.glb import write_glb
    from backend.ovoxel.ovoxel import OVoxel

    if args.output.suffix.lower() != ".glb":
        raise CliError(f"the output must be a .glb file, got {args.output}")
    if not args.ovoxel.is_file():
        raise CliError(f"no such O-Voxel file: {args.ovoxel}")
    settings = asset_settings(args)
    ovoxel = OVoxel.load(args.ovoxel)
    if len(ovoxel.faces) == 0:
        raise CliError(f"{args.ovoxel} holds no mesh to decode")
    mesh = build_textured_mesh(ovoxel, settings, _progress("decode"), args.device)
    write_glb(mesh, args.output)
    print(f"wrote {args.output}: {len(mesh.positions)} vertices, {len(mesh.indices)} faces, "
          f"{mesh.base_color.shape[0]}^2 textures, alpha {mesh.alpha_mode}")
    return 0


def build_textured_mesh(ovoxel: OVoxel, settings: AssetSettings, progress, device: str | None) -> TexturedMesh:
    """The asset post-processing (imported only when decoding: it is the heavy part)."""
    from backend.asset.postprocess import build_textured_mesh as build

    return build(ovoxel, settings, progress=progress, device=device)
