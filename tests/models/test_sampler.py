"""Sampler details beyond the golden trajectories: batched guidance branches, settings, interruption."""

from __future__ import annotations

import pytest
import torch

from backend.trellis2.checkpoint import build_model
from backend.trellis2.sampler import FlowEulerGuidanceSampler, SamplerParams
from backend.trellis2.sparse import SparseTensor

ARGS = {"model_channels": 32, "cond_channels": 16, "num_blocks": 1, "num_heads": 2, "mlp_ratio": 2.0,
        "pe_mode": "rope", "share_mod": True, "qk_rms_norm": True, "qk_rms_norm_cross": True}


def _sparse_case() -> tuple[torch.nn.Module, SparseTensor, dict]:
    torch.manual_seed(0)
    model = build_model({"name": "SLatFlowModel", "args": {**ARGS, "resolution": 8, "in_channels": 8,
                                                           "out_channels": 4}}).eval()
    coords = torch.cat([torch.tensor([[0]] * 20 + [[1]] * 13), torch.randint(0, 8, (33, 3))], 1).int()
    x = SparseTensor(torch.randn(33, 4), coords)
    return model, x, {"concat_cond": x.replace(torch.randn(33, 4))}


def test_batched_guidance_branches_equal_two_separate_forwards() -> None:
    model, x, kwargs = _sparse_case()
    cond, neg = torch.randn(2, 5, 16), torch.zeros(2, 5, 16)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        pos, unc = FlowEulerGuidanceSampler._both_branches(model, x, t, cond, neg, kwargs)
        assert torch.allclose(pos, model(x, t, cond, **kwargs).feats, atol=1e-5)
        assert torch.allclose(unc, model(x, t, neg, **kwargs).feats, atol=1e-5)

    torch.manual_seed(1)
    dense = build_model({"name": "SparseStructureFlowModel",
                         "args": {**ARGS, "resolution": 4, "in_channels": 8, "out_channels": 8}}).eval()
    z = torch.randn(2, 8, 4, 4, 4)
    with torch.no_grad():
        pos, unc = FlowEulerGuidanceSampler._both_branches(dense, z, t, cond, neg, {})
        assert torch.allclose(pos, dense(z, t, cond), atol=1e-5)
        assert torch.allclose(unc, dense(z, t, neg), atol=1e-5)


def test_on_step_reports_each_step_and_can_interrupt() -> None:
    model, x, kwargs = _sparse_case()
    seen = []

    def stop_after_two(step: int, total: int) -> None:
        seen.append((step, total))
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FlowEulerGuidanceSampler().sample(model, x, torch.randn(2, 5, 16), torch.zeros(2, 5, 16),
                                          SamplerParams(steps=5), stop_after_two, **kwargs)
    assert seen == [(1, 5), (2, 5)]


def test_sampler_params_from_a_reference_params_map() -> None:
    params = SamplerParams.from_params({"steps": 20, "guidance_interval": [0.5, 1]})
    assert params == SamplerParams(steps=20, guidance_interval=(0.5, 1.0))
    assert type(params.guidance_interval[1]) is float
