"""Golden kinds for the sparse conv, the SS decoder, the SC-VAE decoders and the dual-grid mesh extraction.

Each handler builds what case.json describes, loads the stored weights strictly and compares every stored
output: floats with `close`, coordinates, faces and flags with `exact`.
"""

from __future__ import annotations

import re

import torch

from backend.ovoxel.dual_grid import flexible_dual_grid_to_mesh
from backend.golden.registry import Case, Check, close, exact, golden_kind
from backend.trellis2.sc_vae import FlexiDualGridVaeDecoder, SparseConv3d, SparseUnetVaeDecoder
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.ss_decoder import SparseStructureDecoder, occupied_coords

# Prefixes of the two state dicts in the weights file of an sc_vae_decoders_forward case (its `weights_note`).
SHAPE_PREFIX, TEXTURE_PREFIX = "shape_dec.", "tex_dec."


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(state, strict=True)
    return model.eval()


def _indexed(tensors: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted indices i of the tensor names matching `pattern` (a regex with one (\\d+) group)."""
    return sorted({int(m.group(1)) for name in tensors if (m := re.fullmatch(pattern, name))})


@golden_kind("sparse_submanifold_conv3d")
def sparse_conv(case: Case) -> list[Check]:
    t = case.tensors
    conv = _load(SparseConv3d(**case.meta["args"]), case.weights)
    with torch.no_grad():
        out = conv(SparseTensor(t["in.feats"], t["in.coords"]))
    return [close("out.feats", out.feats, t["out.feats"])]


@golden_kind("sparse_structure_decoder_forward")
def ss_decoder(case: Case) -> list[Check]:
    t = case.tensors
    decoder = _load(SparseStructureDecoder(**case.meta["args"]), case.weights)
    with torch.no_grad():
        logits = decoder(t["in.z"])
    checks = [close("out.logits", logits, t["out.logits"])]
    if "out.coords_full" in t:
        checks.append(exact("out.coords_full", occupied_coords(logits), t["out.coords_full"]))
    if "out.coords_half" in t:
        half = occupied_coords(logits, logits.shape[-1] // 2)
        checks.append(exact("out.coords_half", half, t["out.coords_half"]))
    return checks


def _upsample_times(meta: dict) -> int | None:
    """The `upsample_times=` of the recorded upsample call, or None (all up-blocks) if it names none."""
    for call in meta.get("calls", []):
        if ".upsample(" in call and (m := re.search(r"upsample_times\s*=\s*(\d+)", call)):
            return int(m.group(1))
    return None


@golden_kind("sc_vae_decoders_forward")
def sc_vae_decoders(case: Case) -> list[Check]:
    t = case.tensors
    shape_dec = _load(
        FlexiDualGridVaeDecoder(**case.meta["shape_decoder"]["args"]), case.weights_with_prefix(SHAPE_PREFIX)
    )
    tex_dec = _load(
        SparseUnetVaeDecoder(**case.meta["texture_decoder"]["args"]), case.weights_with_prefix(TEXTURE_PREFIX)
    )
    if "mesh_grid_size" in case.meta:
        shape_dec.set_resolution(case.meta["mesh_grid_size"])
    coords = t["in.coords"]
    with torch.no_grad():
        shape = shape_dec(SparseTensor(t["in.shape_latent"], coords))
        upsampled = shape_dec.upsample(SparseTensor(t["in.shape_latent"], coords), _upsample_times(case.meta))
        tex = tex_dec(SparseTensor(t["in.tex_latent"], coords), guide_subs=shape.subs)

    checks = [
        exact("out.shape_raw_coords", shape.raw.coords, t["out.shape_raw_coords"]),
        close("out.shape_raw_feats", shape.raw.feats, t["out.shape_raw_feats"]),
        exact("out.upsample_coords", upsampled, t["out.upsample_coords"]),
        close("out.tex_feats", tex.feats, t["out.tex_feats"]),
        close("out.head_vertices", shape.vertices.feats, t["out.head_vertices"]),
        exact("out.head_intersected", shape.intersected.feats, t["out.head_intersected"]),
        close("out.head_quad_lerp", shape.quad_lerp.feats, t["out.head_quad_lerp"]),
    ]
    levels = _indexed(t, r"out\.subs(\d+)_logits")
    if len(levels) != len(shape.subs):
        checks.append(Check("out.subs*", float("inf"), False, f"{len(shape.subs)} levels, case has {len(levels)}"))
    for i, sub in zip(levels, shape.subs):
        checks.append(exact(f"out.subs{i}_coords", sub.coords, t[f"out.subs{i}_coords"]))
        checks.append(close(f"out.subs{i}_logits", sub.feats, t[f"out.subs{i}_logits"]))
    items = _indexed(t, r"out\.mesh(\d+)_faces")
    if len(items) != len(shape.meshes):
        checks.append(Check("out.mesh*", float("inf"), False, f"{len(shape.meshes)} meshes, case has {len(items)}"))
    for b, (vertices, faces) in zip(items, shape.meshes):
        checks.append(close(f"out.mesh{b}_vertices", vertices, t[f"out.mesh{b}_vertices"]))
        checks.append(exact(f"out.mesh{b}_faces", faces, t[f"out.mesh{b}_faces"]))
    return checks


@golden_kind("flexible_dual_grid_to_mesh")
def dual_grid_mesh(case: Case) -> list[Check]:
    t = case.tensors
    aabb = case.meta.get("aabb", [[-0.5] * 3, [0.5] * 3])
    grid_size = case.meta["grid_size"]
    inputs = (t["in.coords"], t["in.dual_vertices"], t["in.intersected"].bool())
    checks = []
    for prefix, split_weight in (("out.", t["in.split_weight"]), ("out.nosplit_", None)):
        if f"{prefix}faces" not in t:
            continue
        vertices, faces = flexible_dual_grid_to_mesh(*inputs, split_weight, aabb=aabb, grid_size=grid_size)
        checks.append(close(f"{prefix}vertices", vertices, t[f"{prefix}vertices"]))
        checks.append(exact(f"{prefix}faces", faces, t[f"{prefix}faces"]))
    return checks
