"""Golden kinds of the texturing pipeline (`shared/reference/golden-texturing/`): the voxeliser, the
spatial-to-channel op, the shape encoder and the pipeline glue.

The voxeliser's rows are compared in our own order after sorting both sides by (x, y, z) (what must match), and
once more in the stored order (which ours reproduces too, and which fixes the encoder's input order).
"""

from __future__ import annotations

import re

import torch

from backend.asset.glb import y_up_to_z_up
from backend.golden.registry import Case, Check, close, exact, golden_kind
from backend.native import VoxelIndex
from backend.ovoxel.encode import normalize_to_unit_cube
from backend.ovoxel.voxelizer import mesh_to_flexible_dual_grid
from backend.trellis2.checkpoint import build_model, load_weights_strict
from backend.trellis2.sampler import SamplerParams
from backend.trellis2.sc_vae import (
    CHANNEL_TO_SPATIAL,
    Subdivision,
    channel_to_spatial,
    spatial_to_channel,
    subdivide,
    subdivision_of,
)
from backend.trellis2.sc_vae_encoder import FlexiDualGridVaeEncoder, SparseResBlockS2C3d
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.stages import SAMPLER, Normalization, sample_texture_slat, seeded_noise
from backend.trellis2.texturing import decode_texture, encode_shape, voxelize


def _xyz_order(coords: torch.Tensor) -> torch.Tensor:
    """Row order sorting integer coordinates [N, D] lexicographically."""
    key = torch.zeros(coords.shape[0], dtype=torch.long)
    for d in range(coords.shape[1]):
        key = key * (int(coords[:, d].max()) + 1 if coords.numel() else 1) + coords[:, d].long()
    return torch.argsort(key)


def voxel_checks(prefix: str, coords: torch.Tensor, dual_vertices: torch.Tensor, intersected: torch.Tensor,
                 t: dict[str, torch.Tensor], names: tuple[str, str, str]) -> list[Check]:
    """Voxeliser outputs against the stored ones: the sets (sorted by xyz) and the stored row order."""
    ref_coords, ref_dual, ref_flags = (t[n] for n in names)
    if coords.shape != ref_coords.shape:
        return [Check(f"{prefix}voxel_count", float("inf"), False, f"{coords.shape[0]} voxels, reference "
                                                                   f"{ref_coords.shape[0]}")]
    ours, theirs = _xyz_order(coords), _xyz_order(ref_coords)
    return [
        exact(f"{prefix}voxel_set", coords[ours], ref_coords[theirs]),
        close(f"{prefix}dual_vertices", dual_vertices[ours], ref_dual[theirs]),
        exact(f"{prefix}intersected", intersected[ours], ref_flags[theirs].bool()),
        exact(f"{prefix}row_order", coords, ref_coords),
    ]


@golden_kind("mesh_to_flexible_dual_grid")
def mesh_to_dual_grid(case: Case) -> list[Check]:
    t = case.tensors
    checks = []
    for name in sorted(t):
        if not (m := re.fullmatch(r"out\.(\w+)_g(\d+)_voxel_indices", name)):
            continue
        mesh, grid_size = m.group(1), int(m.group(2))
        grid = mesh_to_flexible_dual_grid(t[f"in.{mesh}_vertices"], t[f"in.{mesh}_faces"], grid_size,
                                          face_weight=1.0, boundary_weight=0.2, regularization_weight=1e-2)
        stem = f"out.{mesh}_g{grid_size}_"
        checks += voxel_checks(stem, grid.coords, grid.dual_vertices, grid.intersected, t,
                               (f"{stem}voxel_indices", f"{stem}dual_vertices", f"{stem}intersected"))
    return checks


def _parents_and_children(sub: Subdivision) -> tuple[torch.Tensor, torch.Tensor]:
    return sub.slot // 8, sub.slot % 8


@golden_kind("sparse_spatial2channel")
def spatial2channel(case: Case) -> list[Check]:
    t = case.tensors
    x = SparseTensor(t["in.feats"], t["in.coords"])
    y = spatial_to_channel(x)
    sub = y.cache[CHANNEL_TO_SPATIAL]
    parent, child = _parents_and_children(sub)
    occupancy = torch.zeros(y.coords.shape[0] * 8, dtype=torch.bool)
    occupancy[sub.slot] = True
    fresh = SparseTensor(t["in.coarse_feats"], y.coords.clone())  # no recorded hierarchy: guided by occupancy
    guided = channel_to_spatial(fresh, subdivision_of(fresh, occupancy.reshape(-1, 8)))
    cached = channel_to_spatial(y.replace(t["in.coarse_feats"]), subdivision_of(y, None))
    return [
        exact("out.s2c_coords", y.coords, t["out.s2c_coords"]),
        close("out.s2c_feats", y.feats, t["out.s2c_feats"]),
        exact("out.cache_parent_idx", parent, t["out.cache_parent_idx"]),
        exact("out.cache_child_idx", child, t["out.cache_child_idx"]),
        exact("out.cache_fine_coords", sub.coords, t["out.cache_fine_coords"]),
        exact("out.c2s_cache_coords", cached.coords, t["out.c2s_cache_coords"]),
        close("out.c2s_cache_feats", cached.feats, t["out.c2s_cache_feats"]),
        close("out.roundtrip_feats", channel_to_spatial(y, sub).feats, t["out.roundtrip_feats"]),
        exact("out.child_occupancy", occupancy.reshape(-1, 8), t["out.child_occupancy"]),
        exact("out.c2s_guided_coords", guided.coords, t["out.c2s_guided_coords"]),
        close("out.c2s_guided_feats", guided.feats, t["out.c2s_guided_feats"]),
    ]


def hierarchy_levels(latent: SparseTensor) -> list[tuple[torch.Tensor, Subdivision]]:
    """(coarse coords, Subdivision) of every level recorded on an encoder latent, finest level first."""
    levels, coords, cache = [], latent.coords, latent.cache
    while CHANNEL_TO_SPATIAL in cache:
        sub = cache[CHANNEL_TO_SPATIAL]
        levels.append((coords, sub))
        coords, cache = sub.coords, sub.cache
    return levels[::-1]


def occupancy_guides(latent: SparseTensor) -> list[SparseTensor]:
    """Subdivision logits (+1 keep, -1 drop) that make a decoder without the recorded hierarchy reach the same
    voxels (what a cache-less re-implementation passes as guide_subs). Each level's guide is on the rows in the
    order the guided decoder visits them: parent-major, children by increasing index."""
    guides, coords = [], latent.coords
    for _, sub in reversed(hierarchy_levels(latent)):  # coarsest level first
        children = subdivide(coords, torch.ones(coords.shape[0], 8, dtype=torch.bool))[1]
        keep = (VoxelIndex(sub.coords).lookup(children) >= 0).reshape(-1, 8)
        guides.append(SparseTensor(torch.where(keep, 1.0, -1.0), coords))
        coords = subdivide(coords, keep)[1]
    return guides


@golden_kind("shape_encoder_forward")
def shape_encoder(case: Case) -> list[Check]:
    t = case.tensors
    encoder = FlexiDualGridVaeEncoder(**case.meta["args"])
    load_weights_strict(encoder, case.weights, f"{case.path}/weights.safetensors")
    encoder.eval()
    block_outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: block_outputs.append(out.feats))
             for m in encoder.modules() if isinstance(m, SparseResBlockS2C3d)]
    coords = t["in.coords"]
    with torch.no_grad():
        mean, logvar = encoder.encode_dual_grid(SparseTensor(t["in.vertices_local"], coords),
                                                SparseTensor(t["in.intersected"].bool(), coords))
    for hook in hooks:
        hook.remove()
    checks = [
        exact("out.z_coords", mean.coords, t["out.z_coords"]),
        close("out.z", mean.feats, t["out.z"]),
        close("out.mean", mean.feats, t["out.mean"]),
        close("out.logvar", logvar.feats, t["out.logvar"]),
    ]
    levels = hierarchy_levels(mean)
    for level, ((coarse, sub), block_out) in enumerate(zip(levels, block_outputs), start=1):
        parent, child = _parents_and_children(sub)
        stem = f"out.s2c{level}_"
        checks += [
            exact(f"{stem}coarse_coords", coarse, t[f"{stem}coarse_coords"]),
            exact(f"{stem}fine_coords", sub.coords, t[f"{stem}fine_coords"]),
            exact(f"{stem}parent_idx", parent, t[f"{stem}parent_idx"]),
            exact(f"{stem}child_idx", child, t[f"{stem}child_idx"]),
            close(f"{stem}block_out", block_out, t[f"{stem}block_out"]),
        ]
    expected = len({k for k in t if k.endswith("_block_out")})
    if len(levels) != expected:
        checks.append(Check("out.s2c*", float("inf"), False, f"{len(levels)} levels recorded, case has {expected}"))
    return checks


@golden_kind("texturing_pipeline_glue")
def texturing_glue(case: Case) -> list[Check]:
    """The texturing stages replayed one by one, each from the reference's recorded input: mesh preprocessing,
    voxelisation, encoding, normalisation, the seeded noise, the texture sampler, decoding on the encoder's
    hierarchy; then the cache-less decoder path with occupancy guides."""
    meta, t = case.meta, case.tensors
    models = {}
    for key, prefix in (("shape_slat_encoder", "enc."), ("tex_slat_flow_model_1024", "flow."),
                        ("tex_slat_decoder", "dec.")):
        cfg = meta["models"][key]
        model = build_model({"name": cfg["class_name"], "args": cfg["args"]})
        load_weights_strict(model, case.weights_with_prefix(prefix), f"{case.path}/weights.safetensors[{key}]")
        models[key] = model.eval()
    resolution = meta["resolution"]
    shape_norm = Normalization(t["in.shape_mean"], t["in.shape_std"])
    tex_norm = Normalization(t["in.tex_mean"], t["in.tex_std"])
    params = SamplerParams.from_params(meta["pipeline_args"]["tex_slat_sampler_params"])
    cond = t["in.cond"]
    checks = []

    normalized = normalize_to_unit_cube(y_up_to_z_up(t["in.mesh_vertices"].numpy()))[0]
    checks.append(close("out.pre_vertices", torch.from_numpy(normalized), t["out.pre_vertices"]))
    with torch.no_grad():
        grid = voxelize(t["out.pre_vertices"].numpy(), t["in.mesh_faces"].numpy(), resolution, torch.device("cpu"))
        checks += voxel_checks("out.dual_", grid.coords, grid.dual_vertices, grid.intersected, t,
                               ("out.dual_voxel_indices", "out.dual_vertices", "out.dual_intersected"))
        shape_slat = encode_shape(models["shape_slat_encoder"], grid)
        checks.append(exact("out.shape_slat_coords", shape_slat.coords, t["out.shape_slat_coords"]))
        checks.append(close("out.shape_slat", shape_slat.feats, t["out.shape_slat"]))

        recorded = shape_slat.replace(t["out.shape_slat"])  # the reference's latent, on our hierarchy
        concat = shape_norm.normalize(recorded)
        checks.append(close("out.shape_slat_normalised", concat.feats, t["out.shape_slat_normalised"]))
        flow = models["tex_slat_flow_model_1024"]
        noise = seeded_noise(meta["seed"])((recorded.feats.shape[0], flow.in_channels - recorded.feats.shape[1]))
        checks.append(exact("out.noise_recorded(bits)", noise.view(torch.int32), t["out.noise_recorded"].view(torch.int32)))
        trajectory = SAMPLER.sample(flow, recorded.replace(noise), cond, torch.zeros_like(cond), params, record=True,
                                    concat_cond=concat)
        for i in range(params.steps):
            checks.append(close(f"out.pred_x_t_{i}", trajectory.x_prev[i].feats, t[f"out.pred_x_t_{i}"]))
            checks.append(close(f"out.pred_x_0_{i}", trajectory.pred_x0[i].feats, t[f"out.pred_x_0_{i}"]))
        tex_slat = sample_texture_slat(flow, cond, recorded, params, shape_norm, tex_norm, seeded_noise(meta["seed"]))
        checks.append(exact("out.tex_slat_coords", tex_slat.coords, t["out.tex_slat_coords"]))
        checks.append(close("out.tex_slat", tex_slat.feats, t["out.tex_slat"]))

        pbr = decode_texture(models["tex_slat_decoder"], recorded.replace(t["out.tex_slat"]))
        checks.append(exact("out.pbr_coords", pbr.coords, t["out.pbr_coords"]))
        checks.append(close("out.pbr_feats", pbr.feats, t["out.pbr_feats"]))

        guides = occupancy_guides(recorded)
        for i, guide in enumerate(guides):
            checks.append(exact(f"out.guide_coords_{i}", guide.coords, t[f"out.guide_coords_{i}"]))
            checks.append(exact(f"out.guide_occupancy_{i}", guide.feats > 0, t[f"out.guide_occupancy_{i}"]))
        fresh = SparseTensor(t["out.tex_slat"], t["out.tex_slat_coords"])  # no recorded hierarchy
        guided = models["tex_slat_decoder"](fresh, guide_subs=guides)
    ours, theirs = _xyz_order(guided.coords), _xyz_order(t["out.pbr_coords"])
    checks.append(exact("guided.voxel_set", guided.coords[ours], t["out.pbr_coords"][theirs]))
    checks.append(close("guided.pbr_feats", guided.feats[ours] * 0.5 + 0.5, t["out.pbr_feats"][theirs]))
    return checks
