"""Golden kind `pipeline_glue_tiny`: the generation stages replayed one by one from recorded intermediates.

Each stage starts from the reference's own recorded inputs (its noise draws and the previous stage's output),
because the cascade upsample has subdivision logits within ~1e-6 of zero: chaining our outputs end to end could
flip a voxel for reasons of summation order alone (numerics §3).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from backend.golden.registry import Case, Check, close, exact, golden_kind
from backend.trellis2.checkpoint import build_model, load_weights_strict
from backend.trellis2.sampler import SamplerParams
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.stages import (
    NoiseSource,
    Normalization,
    cascade_coords,
    sample_shape_slat,
    sample_sparse_structure,
    sample_texture_slat,
    upsample_lr_shape,
)


def _recorded(tensors: Iterator[torch.Tensor]) -> NoiseSource:
    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        value = next(tensors)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"noise drawn with shape {tuple(shape)}, reference drew {tuple(value.shape)}")
        return value

    return draw


@golden_kind("pipeline_glue_tiny")
def pipeline_glue(case: Case) -> list[Check]:
    meta, t = case.meta, case.tensors
    models = {}
    for key, cfg in meta["models"].items():
        model = build_model({"name": cfg["class_name"], "args": cfg["args"]})
        load_weights_strict(model, case.weights_with_prefix(key + "."), f"{case.path}/weights.safetensors[{key}]")
        models[key] = model.eval()
    params = {k: SamplerParams.from_params(v) for k, v in meta["sampler_params"].items()}
    shape_norm = Normalization.from_config(meta["shape_slat_normalization"])
    tex_norm = Normalization.from_config(meta["tex_slat_normalization"])
    noise = [t[f"in.noise{i}"] for i in range(4)]
    lr_flow = models["shape_slat_flow_model_512"]
    lr_resolution = lr_flow.resolution * 16
    checks = []

    ss_coords = sample_sparse_structure(
        models["sparse_structure_flow_model"], models["sparse_structure_decoder"], t["in.cond_512"],
        lr_flow.resolution, params["ss"], _recorded(iter(noise[:1])),
    )
    checks.append(exact("ss_coords", ss_coords, t["out.ss_coords"]))

    lr_slat = sample_shape_slat(lr_flow, t["in.cond_512"], t["out.ss_coords"], params["shape"], shape_norm,
                                _recorded(iter(noise[1:2])))
    checks.append(exact("lr_slat_coords", lr_slat.coords, t["out.lr_slat_coords"]))
    checks.append(close("lr_slat_feats", lr_slat.feats, t["out.lr_slat_feats"]))

    recorded_lr = SparseTensor(t["out.lr_slat_feats"], t["out.lr_slat_coords"])
    hr_raw = upsample_lr_shape(models["shape_slat_decoder"], recorded_lr)
    checks.append(exact("cascade_hr_coords_raw", hr_raw, t["out.cascade_hr_coords_raw"]))

    hr_base = models["shape_slat_flow_model_1024"].resolution * 16
    hr_coords, hr_resolution = cascade_coords(t["out.cascade_hr_coords_raw"], lr_resolution, hr_base,
                                              meta["hr_resolution"], max_num_tokens=10**9)
    checks.append(exact("shape_slat_coords", hr_coords, t["out.shape_slat_coords"]))
    checks.append(exact("hr_resolution", torch.tensor(hr_resolution), torch.tensor(meta["hr_resolution"])))

    shape_slat = sample_shape_slat(models["shape_slat_flow_model_1024"], t["in.cond_1024"], t["out.shape_slat_coords"],
                                   params["shape"], shape_norm, _recorded(iter(noise[2:3])))
    checks.append(close("shape_slat_feats", shape_slat.feats, t["out.shape_slat_feats"]))

    recorded_shape = SparseTensor(t["out.shape_slat_feats"], t["out.shape_slat_coords"])
    tex_slat = sample_texture_slat(models["tex_slat_flow_model_1024"], t["in.cond_1024"], recorded_shape,
                                   params["tex"], shape_norm, tex_norm, _recorded(iter(noise[3:4])))
    checks.append(close("tex_slat_feats", tex_slat.feats, t["out.tex_slat_feats"]))
    return checks
