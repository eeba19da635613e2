"""The benchmark runner end to end on the tiny models (CPU): stages, counts and the structure oracle's bookkeeping."""

from __future__ import annotations

import torch

from backend.bench.run import Bench, format_result, summary_table
from backend.trellis2 import tiny
from backend.trellis2.pipeline import Trellis2Pipeline


def test_bench_times_the_tiny_pipeline(tiny_checkpoint) -> None:
    configs = {name: (cls, args) for name, (_stem, cls, args) in tiny.MODELS.items()}
    conditioner = Trellis2Pipeline.from_pretrained(str(tiny_checkpoint), device="cpu").conditioner
    bench = Bench(torch.device("cpu"), configs, conditioner)
    assert (bench.ss_grid, bench.lr_grid) == (16, 8)
    small = bench.run("512", "gpu", 2, "torch", "teapot")
    assert list(small.stages) == ["preprocess", "condition", "sparse_structure", "shape", "texture", "decode",
                                  "ovoxel"]
    assert len(small.runs) == 2 and small.seconds == small.runs[-1]
    assert abs(sum(small.stages.values()) - small.seconds) < 1e-6  # stages cover the run, the oracle left out
    assert small.oracle_seconds > 0 and small.lr_tokens == small.hr_tokens > 0  # 512: one latent grid
    assert small.voxels > 0 and small.resolution == 128
    cascade = bench.run("1024_cascade", "gpu", 1, "torch", "calibrated")
    assert cascade.oracle_seconds == 0 and cascade.resolution == 256 and cascade.voxels > 0
    assert {"shape_lr", "upsample", "shape_hr"} <= set(cascade.stages)
    assert "1024_cascade" in format_result(cascade)
    assert summary_table([small, cascade]).count("\n") == 3
