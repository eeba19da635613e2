"""Golden kinds for the flow-Euler guidance sampler, dense and sparse (numerics §4 "Sampler")."""

from __future__ import annotations

import torch

from backend.golden.registry import Case, Check, close, exact, golden_kind
from backend.trellis2.checkpoint import build_model, load_weights_strict
from backend.trellis2.sampler import FlowEulerGuidanceSampler, SamplerParams
from backend.trellis2.schedule import flow_time_pairs
from backend.trellis2.sparse import SparseTensor


def _model(case: Case, config: dict, prefix: str = "") -> torch.nn.Module:
    model = build_model({"name": config["class_name"], "args": config["args"]})
    load_weights_strict(model, case.weights_with_prefix(prefix), f"{case.path}/weights.safetensors")
    return model.eval()


def _params(raw: dict) -> SamplerParams:
    return SamplerParams.from_params(raw)


@golden_kind("flow_euler_cfg_sampler_dense", "flow_euler_cfg_sampler_sparse")
def sampler_case(case: Case) -> list[Check]:
    meta, t = case.meta, case.tensors
    sparse = meta["kind"].endswith("sparse")
    model = _model(case, meta["model"])
    params = _params(meta["params"])
    sampler = FlowEulerGuidanceSampler(**meta.get("sampler_args", {}))
    suffix = "_feats" if sparse else ""
    kwargs = {}
    if sparse:
        coords = t["in.coords"]
        noise = SparseTensor(t["in.noise_feats"], coords)
        if "in.concat_cond_feats" in t:
            kwargs["concat_cond"] = SparseTensor(t["in.concat_cond_feats"], coords)
    else:
        noise = t["in.noise"]
    out = sampler.sample(model, noise, t["in.cond"], t["in.neg_cond"], params, record=True, **kwargs)

    def values(x: torch.Tensor | SparseTensor) -> torch.Tensor:
        return x.feats if isinstance(x, SparseTensor) else x

    grid = [p[0] for p in flow_time_pairs(params.steps, params.rescale_t)] + [0.0]
    checks = [close("t_seq", torch.tensor(grid, dtype=torch.float64), t["out.t_seq"])]
    if "cfg_applied_per_step" in meta:
        checks.append(exact("cfg_applied", torch.tensor(out.cfg_applied), torch.tensor(meta["cfg_applied_per_step"])))
    for i in range(params.steps):
        checks.append(close(f"step{i}_x_prev", values(out.x_prev[i]), t[f"out.step{i}_x_prev{suffix}"]))
        checks.append(close(f"step{i}_pred_x0", values(out.pred_x0[i]), t[f"out.step{i}_pred_x0{suffix}"]))
    checks.append(close("samples", values(out.samples), t[f"out.samples{suffix}"]))
    return checks
