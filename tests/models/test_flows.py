"""Flow transformers: golden cases from the reference, 4B state-dict layout, attention and cross-checks."""

from __future__ import annotations

import math

import pytest
import torch

from backend.golden.flows import FLOW_CLASSES
from backend.trellis2.attention import attention
from backend.trellis2.slat_flow import SLatFlowModel
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.ss_flow import SparseStructureFlowModel
from backend.trellis2.transformer import grid_coords


GOLDEN_CASES = [
    "ss_flow_dense_a",
    "ss_flow_dense_bf16",
    "slat_flow_shape_a",
    "slat_flow_tex_concat_a",
    "slat_flow_elastic_1024_a",
    "slat_flow_shape_bf16",
    "tables_timestep_rope_a",
]
FLOW_MANIFESTS = [
    "sparse_structure_flow_model",
    "shape_slat_flow_model_512",
    "shape_slat_flow_model_1024",
    "tex_slat_flow_model_512",
    "tex_slat_flow_model_1024",
]
TINY = dict(
    in_channels=4, out_channels=4, model_channels=32, cond_channels=8, num_blocks=2, num_heads=2,
    mlp_ratio=2.5, pe_mode="rope", qk_rms_norm=True, qk_rms_norm_cross=True,
)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_case(name: str, golden_failures) -> None:
    checks, failed = golden_failures(name)
    assert checks and not failed, failed


@pytest.mark.parametrize("name", FLOW_MANIFESTS)
def test_state_dict_matches_4b_manifest(name: str, load_manifest) -> None:
    manifest = load_manifest(name)
    with torch.device("meta"):
        model = FLOW_CLASSES[manifest["class_name"]](**manifest["args"])
    params = dict(model.named_parameters())
    ours = [
        [key, list(value.shape), str(value.dtype).removeprefix("torch."), "param" if key in params else "buffer"]
        for key, value in model.state_dict().items()
    ]
    assert ours == manifest["state_dict"]
    assert sum(p.numel() for p in params.values()) == manifest["num_parameters"]


def test_meta_build_then_compute_buffers_equals_eager_build() -> None:
    args = dict(TINY, resolution=3)
    with torch.device("meta"):
        model = SparseStructureFlowModel(**args)
    model.to_empty(device="cpu")
    model.compute_buffers()
    assert torch.equal(model.rope_phases, SparseStructureFlowModel(**args).rope_phases)


def _packed_qkv(q_lens: list[int], kv_lens: list[int], heads: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(kv_lens), heads, dim, generator=g)
    v = torch.randn(sum(kv_lens), heads, dim, generator=g)
    return q, k, v


def _rows(seqlens: list[int], item: int) -> slice:
    start = sum(seqlens[:item])
    return slice(start, start + seqlens[item])


@pytest.mark.parametrize("q_lens,kv_lens", [([5, 9, 4], [5, 9, 4]), ([6, 6, 6], [6, 6, 6]), ([5, 9, 4], [7, 7, 7])])
def test_varlen_attention_never_mixes_items(q_lens: list[int], kv_lens: list[int]) -> None:
    q, k, v = _packed_qkv(q_lens, kv_lens)
    before = attention(q, k, v, q_lens, kv_lens)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[_rows(q_lens, 1)] += 3.0
    k2[_rows(kv_lens, 1)] -= 2.0
    v2[_rows(kv_lens, 1)] *= 5.0
    after = attention(q2, k2, v2, q_lens, kv_lens)
    for item in (0, 2):
        assert torch.equal(before[_rows(q_lens, item)], after[_rows(q_lens, item)])
    assert not torch.allclose(before[_rows(q_lens, 1)], after[_rows(q_lens, 1)])


def _naive_attention_f64(q, k, v, q_lens, kv_lens):
    outs = []
    for item in range(len(q_lens)):
        q_rows, kv_rows = _rows(q_lens, item), _rows(kv_lens, item)
        qi, ki, vi = (x.double().transpose(0, 1) for x in (q[q_rows], k[kv_rows], v[kv_rows]))
        weights = torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        outs.append((weights @ vi).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "q_lens,kv_lens", [([5, 9, 4], [5, 9, 4]), ([6, 6], [6, 6]), ([3, 11], [10, 10]), ([0, 4], [3, 3])]
)
def test_attention_matches_naive_float64(q_lens: list[int], kv_lens: list[int]) -> None:
    q, k, v = _packed_qkv(q_lens, kv_lens, seed=1)
    out = attention(q, k, v, q_lens, kv_lens)
    torch.testing.assert_close(out.double(), _naive_attention_f64(q, k, v, q_lens, kv_lens), atol=1e-5, rtol=1e-5)


def test_dense_layout_attention_matches_packed() -> None:
    q, k, v = _packed_qkv([7, 7], [5, 5], seed=2)
    dense = attention(q.view(2, 7, 2, 8), k.view(2, 5, 2, 8), v.view(2, 5, 2, 8))
    torch.testing.assert_close(dense.reshape(14, 2, 8).double(), _naive_attention_f64(q, k, v, [7, 7], [5, 5]))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial, as the golden cases do (the default init zeroes biases, gains are 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("gamma", "norm2.weight")):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * noise)


@pytest.mark.parametrize("share_mod", [True, False])
def test_dense_model_equals_sparse_model_on_full_grid(share_mod: bool) -> None:
    res, batch = 3, 2
    dense = SparseStructureFlowModel(resolution=res, share_mod=share_mod, **TINY).eval()
    _randomize(dense, seed=3)
    sparse = SLatFlowModel(resolution=res, share_mod=share_mod, **TINY).eval()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not missing and unexpected == ["rope_phases"]

    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 4, res, res, res, generator=g)
    t = torch.tensor([250.0, 900.0])
    cond = torch.randn(batch, 5, 8, generator=g)
    grid = grid_coords(res)
    coords = torch.cat([torch.cat([torch.full((len(grid), 1), b), grid], 1) for b in range(batch)]).int()
    feats = x.reshape(batch, 4, -1).transpose(1, 2).reshape(-1, 4)
    with torch.no_grad():
        v_dense = dense(x, t, cond)
        v_sparse = sparse(SparseTensor(feats, coords), t, cond)
    expected = v_dense.reshape(batch, 4, -1).transpose(1, 2).reshape(-1, 4)
    torch.testing.assert_close(v_sparse.feats, expected, atol=1e-5, rtol=1e-5)
    assert v_dense.abs().max() > 1e-2  # the randomised model produces a non-trivial output
