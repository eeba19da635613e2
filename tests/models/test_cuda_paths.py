"""The CUDA paths of the models against the CPU ones: golden cases on the GPU, CUDA-graph replay of the sampler,
and a full-size bf16 DiT block (Triton kernels) against the CPU reference path."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

import backend.golden.pipeline as golden_pipeline
import backend.golden.samplers as golden_samplers
from backend.trellis2.checkpoint import build_model
from backend.trellis2.cuda_graphs import CAPTURE_STATS, captured_graphs, drop_graphs
from backend.trellis2.sampler import SamplerParams
from backend.trellis2.slat_flow import SLatFlowModel
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.ss_flow import SparseStructureFlowModel
from backend.trellis2.stages import SAMPLER
from backend.trellis2.transformer import ModulatedCrossBlock, Packing, rope_phases

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY_FLOW = dict(in_channels=4, out_channels=4, model_channels=64, cond_channels=16, num_blocks=2, num_heads=2,
                 mlp_ratio=2.5, pe_mode="rope", share_mod=True, qk_rms_norm=True, qk_rms_norm_cross=True)
# Guidance on the first 5 of 8 steps (t' >= 0.7), off on the last 3: each batch layout is seen at least twice,
# so each gets captured (first call eager, second captured).
PARAMS = SamplerParams(steps=8, guidance_strength=3.0, guidance_rescale=0.5, guidance_interval=(0.7, 1.0),
                       rescale_t=3.0)


@CUDA
def test_every_golden_case_passes_on_cuda(golden_dir, golden_failures, monkeypatch) -> None:
    """The goldens' own handlers with every model and tensor on the GPU (fp32 cases at 1e-4)."""
    import backend.golden.registry as registry

    monkeypatch.setattr(registry, "load_file", functools.partial(load_file, device="cuda"))
    for module in (golden_samplers, golden_pipeline):  # their handlers build models on an explicit device
        monkeypatch.setattr(module, "build_model", lambda config: build_model(config, "cuda"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 cases mean fp32 convolutions
    names = sorted(p.name for p in golden_dir.iterdir() if (p / "case.json").is_file())
    failures = {}
    with torch.device("cuda"):
        for name in names:
            checks, failed = golden_failures(name)
            worst = max((c for c in checks if c.note != "exact"), key=lambda c: c.error, default=None)
            print(f"{name}: worst |err| {worst.error:.3g} ({worst.name} {worst.note})" if worst else f"{name}: exact")
            if not checks or failed:
                failures[name] = failed or ["no checks"]
    assert names and not failures, failures


def _sparse_input(seed: int) -> tuple[SparseTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for item, count in enumerate((70, 70)):
        cells = torch.randperm(8**3, generator=g)[:count]
        parts.append(torch.stack([torch.full_like(cells, item), cells // 64, cells // 8 % 8, cells % 8], dim=1))
    coords = torch.cat(parts).int().cuda()
    return SparseTensor(torch.randn(coords.shape[0], 4, generator=g).cuda(), coords), torch.randn(
        2, 5, 16, generator=g).cuda()


@CUDA
@torch.inference_mode()
def test_captured_graphs_replay_the_eager_sampler() -> None:
    torch.manual_seed(0)
    flow = SLatFlowModel(resolution=8, **TINY_FLOW).cuda().eval()
    x, cond = _sparse_input(1)
    eager = SAMPLER.sample(flow, x, cond, torch.zeros_like(cond), PARAMS).samples.feats
    before = dict(CAPTURE_STATS)
    x, cond = _sparse_input(1)  # a fresh voxel-set cache
    with captured_graphs(flow):
        graphed = SAMPLER.sample(flow, x, cond, torch.zeros_like(cond), PARAMS).samples.feats
    assert CAPTURE_STATS["failures"] == before["failures"]
    assert CAPTURE_STATS["graphs"] - before["graphs"] == 2  # the doubled guidance batch and the single one
    assert flow.graphs is None  # a sparse flow's graphs end with the session
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)


@CUDA
@torch.inference_mode()
def test_dense_flow_keeps_its_graphs_until_dropped() -> None:
    torch.manual_seed(0)
    flow = SparseStructureFlowModel(resolution=4, **{**TINY_FLOW, "in_channels": 8, "out_channels": 8}).cuda().eval()
    noise = torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(2)).cuda()
    cond = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(3)).cuda()

    def sample() -> torch.Tensor:
        with captured_graphs(flow, keep=True):
            return SAMPLER.sample(flow, noise, cond, torch.zeros_like(cond), PARAMS).samples

    eager = SAMPLER.sample(flow, noise, cond, torch.zeros_like(cond), PARAMS).samples
    counts = [CAPTURE_STATS["graphs"]]
    results = []
    for _ in range(2):
        results.append(sample())
        counts.append(CAPTURE_STATS["graphs"])
    drop_graphs(flow)
    results.append(sample())
    counts.append(CAPTURE_STATS["graphs"])
    assert [b - a for a, b in zip(counts, counts[1:])] == [2, 0, 2]  # kept graphs serve the second session
    for result in results:
        torch.testing.assert_close(result, eager, atol=1e-5, rtol=1e-5)


def test_graph_sessions_leave_cpu_models_alone() -> None:
    flow = SLatFlowModel(resolution=8, **TINY_FLOW)
    with captured_graphs(flow):
        assert flow.graphs is None


@CUDA
@torch.inference_mode()
def test_full_size_bf16_block_follows_the_cpu_path() -> None:
    """One 4B-size block (bf16 torso, two batch items as in guided steps): GPU kernels vs the CPU reference."""
    torch.manual_seed(0)
    block = ModulatedCrossBlock(1536, 1024, 12, 5.3334, True, True, True, torch.bfloat16).eval()
    for name, p in block.named_parameters():
        p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() >= 2 else 0.05) + ("norm" in name))
    g = torch.Generator().manual_seed(1)
    lengths = [300, 300]
    coords = torch.stack(torch.meshgrid(*[torch.arange(7)] * 3, indexing="ij"), -1).reshape(-1, 3)[:300]
    x = torch.randn(sum(lengths), 1536, generator=g).bfloat16()
    mod = (torch.randn(2, 6 * 1536, generator=g) * 0.3).bfloat16()
    cond = torch.randn(2, 64, 1024, generator=g).bfloat16()
    phases = rope_phases(coords, 128).repeat(2, 1)
    cpu = block(x, mod, cond, Packing(lengths, x.device), phases).float()
    block.cuda()
    gpu = block(x.cuda(), mod.cuda(), cond.cuda(), Packing(lengths, torch.device("cuda")), phases.cuda())
    rel = float((gpu.float().cpu() - cpu).norm() / cpu.norm())
    print(f"full-size bf16 block, GPU vs CPU: rel-L2 {rel:.2e}, max |diff| {(gpu.float().cpu() - cpu).abs().max():.3g}")
    assert rel <= 1e-2, rel
