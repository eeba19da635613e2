"""O-Voxel -> TexturedMesh: the whole post-process (our `to_glb`, spec §7.4), one step per module.

1. reference surface: drop degenerate/duplicate faces and unreferenced vertices, unify winding, fill small
   holes (holes.py). Baking projects onto this surface.
2. geometry: either clean + simplify to the face target (cleanup.py, simplify.py), or, with remesh, the
   narrow-band dual-contouring shell (remesh.py) simplified to the target.
3. UV atlas (uv.py), bake + push-pull fill + 8-bit (bake.py), vertex normals, material flags.

Nothing is cached between calls: re-processing an O-Voxel with other settings is fast because every step is.
All steps are whole-tensor torch code, so `device` picks the CPU or GPU path with the same results up to
floating-point order.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from backend.asset.bake import texel_attributes, to_textures
from backend.asset.cleanup import clean, remove_degenerate_and_duplicate_faces, unify_orientation
from backend.asset.holes import fill_small_holes
from backend.asset.meshutil import compact, edges_of, vertex_normals
from backend.asset.remesh import remesh_narrow_band
from backend.asset.simplify import simplify
from backend.asset.textured_mesh import AssetSettings, TexturedMesh
from backend.asset.uv import unwrap
from backend.errors import NoSurface
from backend.ovoxel.ovoxel import OVoxel
from backend.progress import ProgressCallback, Stage, ignore_progress

# The stages this step reports, with their share of its time (measured on the GPU at 500k faces, 2048² textures).
REFERENCE = Stage("reference", 1.0)
REMESH = Stage("remesh", 6.0)
SIMPLIFY = Stage("simplify", 3.0)
UV = Stage("uv", 3.0)
BAKE = Stage("bake", 2.0)
TEXTURES = Stage("textures", 1.0)
ALPHA_OPAQUE_MIN = 250  # AUTO alpha: BLEND only when some covered texel is visibly transparent


class _Stages:
    """Reports each stage to the caller's progress callback; records its wall time and, on a GPU, peak memory."""

    def __init__(self, progress: ProgressCallback, device: torch.device) -> None:
        self.progress, self.device = progress, device
        self.timings: dict[str, float] = {}
        self.peak_memory: dict[str, int] = {}

    def run(self, stage: Stage, fn: Callable[[], object]) -> object:
        name = stage.name
        self.report(name, 0, 1)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_memory[name] = torch.cuda.max_memory_allocated(self.device)
        self.timings[name] = time.perf_counter() - start
        self.report(name, 1, 1)
        return out

    def report(self, name: str, step: int, total: int) -> None:
        self.progress(name, step, total)


def asset_stages(settings: AssetSettings) -> tuple[Stage, ...]:
    return (REFERENCE, *((REMESH,) if settings.remesh else ()), SIMPLIFY, UV, BAKE, TEXTURES)


def reference_surface(vertices: torch.Tensor, faces: torch.Tensor, max_hole_perimeter: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded surface made tidy enough to project onto: consistent winding, small holes closed."""
    vertices, faces = compact(vertices, remove_degenerate_and_duplicate_faces(faces))
    return fill_small_holes(vertices, unify_orientation(vertices, faces), max_hole_perimeter)


def resolve_alpha_mode(settings: AssetSettings, base_color: torch.Tensor, covered: torch.Tensor) -> str:
    if settings.alpha_mode != "AUTO":
        return settings.alpha_mode
    alpha = base_color[..., 3][covered]
    return "BLEND" if alpha.numel() and int(alpha.min()) < ALPHA_OPAQUE_MIN else "OPAQUE"


def _surface_left(faces: np.ndarray | torch.Tensor, where: str) -> None:
    if faces.shape[0] == 0:
        raise NoSurface(where)


def build_textured_mesh(ovoxel: OVoxel, settings: AssetSettings, progress: ProgressCallback = ignore_progress,
                        device: torch.device | str | None = None) -> TexturedMesh:
    """The textured, UV-mapped mesh of an O-Voxel. progress(stage, step, total); raising from it cancels."""
    _surface_left(ovoxel.faces, "the O-Voxel has no face")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    stages = _Stages(progress, device)
    vertices = torch.from_numpy(ovoxel.vertices).to(device)
    faces = torch.from_numpy(ovoxel.faces).to(device)

    ref_v, ref_f = stages.run(REFERENCE, lambda: reference_surface(vertices, faces, settings.fill_hole_perimeter))
    _surface_left(ref_f, "every face of the decoded surface is degenerate")
    if settings.remesh:
        mesh_v, mesh_f = stages.run(REMESH, lambda: clean(*remesh_narrow_band(
            ref_v, ref_f, ovoxel.resolution, settings.remesh_band)))
    else:
        mesh_v, mesh_f = clean(ref_v, ref_f)

    def reduce() -> tuple[torch.Tensor, torch.Tensor]:
        v, f = simplify(mesh_v, mesh_f, settings.faces, progress=lambda done, total: stages.report(
            SIMPLIFY.name, done, total))
        return clean(v, f)

    mesh_v, mesh_f = stages.run(SIMPLIFY, reduce)
    _surface_left(mesh_f, "no face is left after cleaning and simplifying")
    layout = stages.run(UV, lambda: unwrap(mesh_v, mesh_f, settings.texture_size))
    _surface_left(layout.faces, "every face has zero area in the UV unwrap")
    coords = torch.from_numpy(ovoxel.coords).to(device)
    attrs = torch.from_numpy(ovoxel.attrs).to(device)
    origin = torch.from_numpy(ovoxel.origin).to(device)
    image, covered = stages.run(BAKE, lambda: texel_attributes(
        layout, mesh_v, ref_v, ref_f, coords, attrs, ovoxel.voxel_size, origin, settings.texture_size,
        offset=settings.remesh_band if settings.remesh else 0.0))
    textures = stages.run(TEXTURES, lambda: to_textures(image, covered))

    kept = mesh_f[layout.source_face]  # the unwrap drops zero-area faces
    normals = vertex_normals(mesh_v, kept)[layout.vertex]
    open_edges = bool((edges_of(kept, mesh_v.shape[0]).count == 1).any())
    return TexturedMesh(
        positions=mesh_v[layout.vertex].float().cpu().numpy(),
        indices=layout.faces.int().cpu().numpy(),
        normals=normals.float().cpu().numpy(),
        uvs=layout.uv.cpu().numpy(),
        base_color=textures.base_color.cpu().numpy(),
        metallic_roughness=textures.metallic_roughness.cpu().numpy(),
        alpha_mode=resolve_alpha_mode(settings, textures.base_color, covered),
        alpha_cutoff=settings.alpha_cutoff,
        double_sided=open_edges,
        metadata={
            "timings": stages.timings,
            "peak_memory": stages.peak_memory,
            "faces": int(layout.faces.shape[0]),
            "charts": layout.num_charts,
            "uv_utilization": layout.utilization,
            "device": str(device),
        },
    )

