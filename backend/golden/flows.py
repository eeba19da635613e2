"""Golden handlers for the flow transformers and their standalone tables (timestep, RoPE, RMSNorm, time grid).

Sizes, dtypes and batch layouts are read from each case; nothing here is specific to one case folder.
"""

from __future__ import annotations

import re

import torch

from backend.golden.registry import Case, Check, close, exact, golden_kind
from backend.native.rms_norm_rope import apply_rope_torch as apply_rope
from backend.trellis2.schedule import flow_time_pairs
from backend.trellis2.slat_flow import ElasticSLatFlowModel, SLatFlowModel
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.ss_flow import SparseStructureFlowModel
from backend.trellis2.transformer import (
    MultiHeadRMSNorm,
    grid_coords,
    rope_frequencies,
    rope_phases,
    timestep_embedding,
)

FLOW_CLASSES = {
    cls.__name__: cls for cls in (SparseStructureFlowModel, SLatFlowModel, ElasticSLatFlowModel)
}


def _build_flow(case: Case) -> tuple[torch.nn.Module, list[Check]]:
    """The case's model with its stored weights, plus a check that our state dict has exactly the stored
    names, shapes and dtypes (computed buffers aside): this pins the bf16/fp32 split of every parameter."""
    model = FLOW_CLASSES[case.meta["class_name"]](**case.meta["args"]).eval()
    computed = set(getattr(model, "COMPUTED_BUFFERS", ()))
    ours = {k: v for k, v in model.state_dict().items() if k not in computed}
    mismatched = set(ours) ^ set(case.weights)
    mismatched |= {
        k for k in set(ours) & set(case.weights)
        if ours[k].shape != case.weights[k].shape or ours[k].dtype != case.weights[k].dtype
    }
    model.load_state_dict(case.weights, strict=False)
    note = "names/shapes/dtypes" + (f"; e.g. {sorted(mismatched)[:3]}" if mismatched else "")
    return model, [Check("state_dict", float(len(mismatched)), not mismatched, note)]


def _is_bf16(case: Case) -> bool:
    return case.meta.get("dtype") in ("bfloat16", "float16")


@golden_kind("sparse_structure_flow_forward")
def sparse_structure_flow_forward(case: Case) -> list[Check]:
    model, checks = _build_flow(case)
    tensors = case.tensors
    with torch.no_grad():
        v = model(tensors["in.x"], tensors["in.t"], tensors["in.cond"])
    checks.append(close("v", v, tensors["out.v"], bf16=_is_bf16(case)))
    if "buffer.rope_phases" in tensors:
        checks.append(close("buffer.rope_phases", torch.view_as_real(model.rope_phases), tensors["buffer.rope_phases"]))
    return checks


@golden_kind("slat_flow_forward")
def slat_flow_forward(case: Case) -> list[Check]:
    model, checks = _build_flow(case)
    tensors = case.tensors
    coords = tensors["in.coords"]
    x = SparseTensor(tensors["in.feats"], coords)
    concat = tensors.get("in.concat_cond_feats")
    with torch.no_grad():
        v = model(x, tensors["in.t"], tensors["in.cond"], None if concat is None else SparseTensor(concat, coords))
    if "batch_lengths" in case.meta:
        checks.append(exact("batch_lengths", torch.tensor(x.seqlens), torch.tensor(case.meta["batch_lengths"])))
    checks.append(close("v_feats", v.feats, tensors["out.v_feats"], bf16=_is_bf16(case)))
    return checks


def _dense_phases(tensors: dict[str, torch.Tensor], head_dim: int) -> tuple[torch.Tensor, Check]:
    """Phases of our dense grid, and a check that the grid order equals the stored coords."""
    stored = tensors["in.dense_grid_coords"]
    ours = grid_coords(round(stored.shape[0] ** (1 / 3)))
    return rope_phases(ours, head_dim), exact("dense_grid_coords", ours, stored)


@golden_kind("standalone_tables")
def standalone_tables(case: Case) -> list[Check]:
    """Every stored `out.*` is recomputed; an output this handler does not understand fails."""
    tensors = case.tensors
    checks: list[Check] = []
    for name, expected in tensors.items():
        if not name.startswith("out."):
            continue
        item = name[len("out."):]
        if m := re.fullmatch(r"timestep_embedding_(\d+)", item):
            actual = timestep_embedding(tensors["in.t"], int(m[1]))
        elif m := re.fullmatch(r"rope_freqs_hd(\d+)", item):
            actual = rope_frequencies(int(m[1]))
        elif m := re.fullmatch(r"dense_rope_phases_hd(\d+)", item):
            phases, grid_check = _dense_phases(tensors, int(m[1]))
            checks.append(grid_check)
            actual = torch.view_as_real(phases)
        elif m := re.fullmatch(r"sparse_rope_phases_hd(\d+)", item):
            actual = torch.view_as_real(rope_phases(tensors["in.sparse_coords"][:, 1:], int(m[1])))
        elif m := re.fullmatch(r"sparse_([qk])_rope", item):
            x = tensors[f"in.sparse_{m[1]}"]
            actual = apply_rope(x, rope_phases(tensors["in.sparse_coords"][:, 1:], x.shape[-1]))
        elif item == "dense_x_rope":
            x = tensors["in.dense_x"]
            phases, _ = _dense_phases(tensors, x.shape[-1])
            actual = apply_rope(x, phases[tensors["in.dense_x_rows"]])
        elif item == "rms_y":
            gamma = tensors["in.rms_gamma"]
            norm = MultiHeadRMSNorm(gamma.shape[1], gamma.shape[0])
            with torch.no_grad():
                norm.gamma.copy_(gamma)
                actual = norm(tensors["in.rms_x"])
        elif m := re.fullmatch(r"t_seq_steps(\d+)_rescale([0-9.]+)", item):
            pairs = flow_time_pairs(int(m[1]), float(m[2]))
            actual = torch.tensor([pairs[0][0]] + [t_prev for _, t_prev in pairs], dtype=torch.float64)
        else:
            checks.append(Check(item, float("inf"), False, "no recipe for this stored output"))
            continue
        checks.append(close(item, actual, expected))
    return checks
