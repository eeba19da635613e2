"""`python -m backend bench`: the full-size pipeline with random weights on this machine's GPU.

Prints the device, driver and library versions, then per pipeline type and memory mode a stage table with peak
GPU memory, token and voxel counts and what CUDA-graph capture cost; `--json` keeps everything. Needs no
checkpoint: speed and memory depend on sizes and token counts only, and the token counts come from a procedural
object's structure (backend/bench/objects.py) or, with `--structure calibrated`, from the older bias calibration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backend.native import KERNEL_MODES

PIPELINES = ("512", "1024_cascade", "1536_cascade")
STRUCTURES = ("figure", "chair", "teapot", "calibrated")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time the full-size pipeline (random weights) on this GPU, per stage")
    p.add_argument("--pipeline", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    p.add_argument("--structure", choices=STRUCTURES, default="figure",
                   help="procedural object whose voxels the random networks are made to produce, or 'calibrated'")
    p.add_argument("--memory", nargs="+", choices=("gpu", "offload", "auto"), default=["gpu"],
                   help="memory modes to time (auto: as the server would pick from free GPU memory)")
    p.add_argument("--kernels", nargs="+", choices=KERNEL_MODES, default=["auto"],
                   help="auto: Triton kernels + CUDA graphs; eager: kernels only; torch: plain-torch references")
    p.add_argument("--runs", type=int, default=2, help="runs per configuration; the last is reported")
    p.add_argument("--asset", action="store_true", help="also time the asset step (500k faces, 2048² textures)")
    p.add_argument("--json", type=Path, help="write every result to this file")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    from backend.bench.run import Bench, environment, format_result, summary_table, to_json
    from backend.native import kernel_mode
    from backend.errors import JobFailure

    device = torch.device("cuda")
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    bench = Bench(device)
    results = []
    for kernels in args.kernels:
        with kernel_mode(kernels):
            for memory in args.memory:
                for pipeline in args.pipeline:
                    try:
                        result = bench.run(pipeline, memory, args.runs, kernels, args.structure, args.asset)
                    except JobFailure as exc:
                        print(f"{pipeline} | memory {memory} | kernels {kernels}: FAILED {exc}", flush=True)
                        continue
                    results.append(result)
                    print(format_result(result), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(to_json(env, results), indent=1))
    print(summary_table(results))
    return 0 if results else 1
