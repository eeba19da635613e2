"""O-Voxel -> TexturedMesh: the whole post-process (our `to_glb`, spec §7.4), one step per module.

1. reference surface: degenerate/duplicate faces and unreferenced vertices dropped, one winding (orientation.py),
   non-manifold spots resolved (manifold.py), holes shorter than the limit filled (holes.py), each piece turned
   to face outwards, coincident vertices parted. A closed object comes out a closed 2-manifold. Baking projects
   onto this surface, whose vertices carry the attributes of their own voxels.
2. geometry: either the reference surface cleaned and simplified to the face target (cleanup.py, simplify.py), or,
   with remesh, the narrow-band dual-contouring shell (remesh.py) made manifold and simplified to the target.
3. UV atlas (uv.py), bake + push-pull fill + 8-bit (bake.py), smooth normals with sharp edges kept (normals.py),
   material flags: double-sided only when the mesh has open borders.

Output vertices are split along UV seams and creases (glTF needs that); a position is shared only by copies of
one surface vertex, so a consumer may weld by position and get the manifold back.
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
from backend.asset.cleanup import clean, face_components, remove_degenerate_and_duplicate_faces
from backend.asset.cuts import close_cuts
from backend.asset.holes import fill_small_holes
from backend.asset.manifold import make_manifold, separate_coincident
from backend.asset.meshutil import compact_indices, edges_of
from backend.asset.normals import smooth_normals
from backend.asset.orientation import orient_outward, unify_orientation
from backend.asset.remesh import remesh_narrow_band
from backend.asset.sampling import sample_trilinear
from backend.asset.simplify import simplify
from backend.asset.textured_mesh import AssetSettings, TexturedMesh
from backend.asset.uv import unwrap
from backend.errors import NoSurface
from backend.native import VoxelIndex
from backend.ovoxel.ovoxel import OVoxel
from backend.progress import ProgressCallback, Stage, ignore_progress

# The stages this step reports, with their share of its time (measured on the GPU at 500k faces, 2048² textures).
REFERENCE = Stage("reference", 2.0)
REMESH = Stage("remesh", 6.0)
SIMPLIFY = Stage("simplify", 3.0)
UV = Stage("uv", 3.0)
BAKE = Stage("bake", 2.0)
TEXTURES = Stage("textures", 1.0)
NORMALS = Stage("normals", 1.0)
# AUTO alpha. The decoded alpha is a regression output, so nearly every object dips below 1 somewhere: a texel
# counts as clearly transparent below ALPHA_CLEAR, the object as see-through only when a visible share of its covered
# texels is; then a cut-out (MASK) when few of those are partly transparent, else BLEND (glass, smoke).
ALPHA_CLEAR = 230  # 0.9
ALPHA_GONE = 26  # 0.1: below this a texel is simply cut away
ALPHA_SEE_THROUGH_SHARE = 0.005  # of the covered texels
ALPHA_PARTIAL_SHARE = 0.25  # of the clearly transparent texels
MIN_HOLE_VOXELS = 16.0  # holes shorter than this many voxels are filled whatever the world-unit limit says
SEPARATION_VOXELS = 0.05  # how far coincident vertices are moved apart
SLIT_VOXELS = 0.5  # loops narrower than this on average are filled whatever their length (cuts, not holes)
PAIRING_ROUNDS = 2  # manifold repairs, each with the winding the previous one's bodies give


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
    return (REFERENCE, *((REMESH,) if settings.remesh else ()), SIMPLIFY, UV, BAKE, TEXTURES, NORMALS)


def manifold_surface(vertices: torch.Tensor, faces: torch.Tensor, max_hole_perimeter: float, separation: float,
                     max_slit_width: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vertices, faces, origin) of a mesh made a consistently wound, outward-facing 2-manifold with small holes
    closed; origin [V'] is the input vertex each vertex copies (-1 for the centres of filled holes)."""
    kept, f = compact_indices(remove_degenerate_and_duplicate_faces(faces), vertices.shape[0])
    v = vertices[kept]
    f = unify_orientation(v, f)
    # Which way a piece between junctions faces is a guess until the pieces are joined into bodies; a second
    # pairing with the winding of those bodies closes what the guesses left open.
    for _ in range(PAIRING_ROUNDS - 1):
        v1, f1, origin1 = make_manifold(v, f)
        f1 = orient_outward(v1, f1, face_components(f1, v1.shape[0]))[: f.shape[0]]
        f = torch.where(same_winding(origin1[f1.long()], f.long()).unsqueeze(1), f, f[:, [0, 2, 1]])
    source_f = f
    v, f, origin = make_manifold(v, f)
    v, f = fill_small_holes(v, f, max_hole_perimeter, max_slit_width)
    origin = torch.cat([origin, origin.new_full((v.shape[0] - origin.shape[0],), -1)])
    f = close_cuts(v, f, origin, source_f)
    origin = torch.where(origin >= 0, kept[origin.clamp_min(0)], origin)
    f = orient_outward(v, f, face_components(f, v.shape[0]))
    return separate_coincident(v, f, separation), f, origin


def same_winding(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether each face of `a` [F, 3] runs its corners in the same cyclic order as the face of `b` over them."""
    return (a == b).all(dim=1) | (a == b.roll(1, dims=1)).all(dim=1) | (a == b.roll(-1, dims=1)).all(dim=1)


def vertex_attributes(ovoxel: OVoxel, vertices: torch.Tensor, faces: torch.Tensor, origin: torch.Tensor
                      ) -> torch.Tensor:
    """[V, 6] attributes per reference vertex: those of its own voxel when the O-Voxel's mesh has one vertex per
    voxel (as the decoder and the encoder make it), else trilinear samples at the vertex. Vertices without a
    voxel (centres of filled holes) take the mean of their neighbours'."""
    attrs = torch.from_numpy(ovoxel.attrs).to(vertices.device)
    if ovoxel.vertices.shape[0] != ovoxel.coords.shape[0]:
        coords = torch.from_numpy(ovoxel.coords).to(vertices.device)
        origin_xyz = torch.from_numpy(ovoxel.origin).to(vertices.device)
        return sample_trilinear(VoxelIndex(coords), attrs, (vertices.float() - origin_xyz) / ovoxel.voxel_size)
    out = attrs[origin.clamp_min(0)]
    missing = origin < 0
    if bool(missing.any()):
        f = faces.long()
        total = torch.zeros_like(out)
        count = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        for k in range(3):
            for j in (1, 2):
                src = f[:, (k + j) % 3]
                has = (~missing[src]).to(out.dtype)
                total.index_add_(0, f[:, k], out[src] * has.unsqueeze(1))
                count.index_add_(0, f[:, k], has)
        out = torch.where(missing.unsqueeze(1), total / count.clamp_min(1).unsqueeze(1), out)
    return out


def resolve_alpha_mode(settings: AssetSettings, base_color: torch.Tensor, covered: torch.Tensor) -> str:
    """The glTF alpha mode: the setting's, or for AUTO the rule above (OPAQUE, MASK or BLEND)."""
    if settings.alpha_mode != "AUTO":
        return settings.alpha_mode
    alpha = base_color[..., 3][covered].int()
    clear = alpha < ALPHA_CLEAR
    n_clear = int(clear.sum())
    if not alpha.numel() or n_clear < ALPHA_SEE_THROUGH_SHARE * alpha.numel():
        return "OPAQUE"
    partial = int((clear & (alpha >= ALPHA_GONE)).sum())
    return "MASK" if partial < ALPHA_PARTIAL_SHARE * n_clear else "BLEND"


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

    h = ovoxel.voxel_size
    hole_limit = max(settings.fill_hole_perimeter, MIN_HOLE_VOXELS * h)
    separation = SEPARATION_VOXELS * h

    def reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, f, origin = manifold_surface(vertices, faces, hole_limit, separation, SLIT_VOXELS * h)
        return v, f, vertex_attributes(ovoxel, v, f, origin)

    ref_v, ref_f, ref_attrs = stages.run(REFERENCE, reference)
    _surface_left(ref_f, "every face of the decoded surface is degenerate")
    if settings.remesh:
        mesh_v, mesh_f = stages.run(REMESH, lambda: clean(*manifold_surface(*remesh_narrow_band(
            ref_v, ref_f, ovoxel.resolution, settings.remesh_band), hole_limit, separation, SLIT_VOXELS * h)[:2]))
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
    image, covered = stages.run(BAKE, lambda: texel_attributes(
        layout, mesh_v, ref_v, ref_f, ref_attrs, h, settings.texture_size,
        offset=settings.remesh_band if settings.remesh else 0.0))
    textures = stages.run(TEXTURES, lambda: to_textures(image, covered))

    kept = mesh_f[layout.source_face]  # the unwrap drops zero-area faces

    def normals() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output vertices: one per (UV vertex, smoothing fan) pair; their normals; the faces over them."""
        fan, fan_normal = smooth_normals(mesh_v, kept, settings.sharp_angle)
        key = layout.faces.reshape(-1) * (int(fan.max()) + 1) + fan.reshape(-1)
        unique, corner_vertex = torch.unique(key, return_inverse=True)
        uv_vertex = unique // (int(fan.max()) + 1)
        vertex_fan = torch.zeros_like(unique)
        vertex_fan[corner_vertex] = fan.reshape(-1)
        return uv_vertex, fan_normal[vertex_fan], corner_vertex.reshape(-1, 3)

    uv_vertex, out_normals, out_faces = stages.run(NORMALS, normals)
    open_edges = bool((edges_of(kept, mesh_v.shape[0]).count == 1).any())
    return TexturedMesh(
        positions=mesh_v[layout.vertex[uv_vertex]].float().cpu().numpy(),
        indices=out_faces.int().cpu().numpy(),
        normals=out_normals.float().cpu().numpy(),
        uvs=layout.uv[uv_vertex].cpu().numpy(),
        base_color=textures.base_color.cpu().numpy(),
        metallic_roughness=textures.metallic_roughness.cpu().numpy(),
        alpha_mode=resolve_alpha_mode(settings, textures.base_color, covered),
        alpha_cutoff=settings.alpha_cutoff,
        double_sided=open_edges,
        metadata={
            "timings": stages.timings,
            "peak_memory": stages.peak_memory,
            "faces": int(out_faces.shape[0]),
            "charts": layout.num_charts,
            "uv_utilization": layout.utilization,
            "device": str(device),
        },
    )
