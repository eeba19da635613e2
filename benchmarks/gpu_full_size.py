"""GPU benchmark at full 4B size with random weights: flows, a profile of where the time goes, whole pipelines.

1. Flow forwards (one pass, batch 1 and the doubled guidance batch) in three kernel modes: torch (the plain
   references, as before the native kernels), eager (Triton kernels) and graphed (kernels + CUDA-graph replay).
2. torch.profiler tables of one HR shape-flow forward (torch and kernels) and of the two decoders.
3. Whole pipelines through `backend.bench` (`python -m backend bench` is the same code): the procedural figure's
   structure for 512 / 1024_cascade / 1536_cascade, the old random calibration for comparison with earlier
   numbers, kernels off (torch) for the old-vs-new comparison, and `--memory offload`.
Items stop being started once `--budget` seconds have passed, so one call fits a device lease.

Run on the GPU machine: `python benchmarks/gpu_full_size.py --out DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.bench.full_size import random_model
from backend.bench.objects import OBJECTS
from backend.bench.run import Bench, environment, format_result, summary_table, to_json
from backend.native import kernel_mode
from backend.trellis2.cuda_graphs import captured_graphs
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.transformer import grid_coords


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def flow_inputs(name: str, tokens: int, batch: int, device: torch.device
                ) -> tuple[Any, torch.Tensor, torch.Tensor, dict]:
    """Inputs of one forward: dense 16^3 for the structure flow, else `tokens` voxels of the figure's shell."""
    cond = torch.randn(batch, 1029 if tokens <= 4096 else 4101, 1024, device=device)
    t = torch.full((batch,), 500.0, device=device)
    if name.startswith("sparse"):
        return torch.randn(batch, 8, 16, 16, 16, device=device), t, cond, {}
    grid = 64 if tokens <= 20000 else 96
    all_cells = grid_coords(grid)
    cells = all_cells[OBJECTS["figure"]().crosses(all_cells, grid)][:tokens].to(device)
    coords = torch.cat([torch.arange(batch, device=device).repeat_interleave(cells.shape[0])[:, None],
                        cells.repeat(batch, 1)], 1).int()
    x = SparseTensor(torch.randn(coords.shape[0], 32, device=device), coords)
    return x, t, cond, ({"concat_cond": x} if "tex" in name else {})


def time_forward(model: torch.nn.Module, inputs: tuple, graphed: bool, repeats: int = 5) -> float:
    x, t, cond, kwargs = inputs
    with torch.inference_mode(), captured_graphs(model) if graphed else contextlib.nullcontext():
        for _ in range(2):  # eager warm-up, then (graphed) the capture
            model(x, t, cond, **kwargs)
        start = sync_time()
        for _ in range(repeats):
            model(x, t, cond, **kwargs)
        return (sync_time() - start) / repeats * 1e3


def bench_flows(device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for name, token_counts in (("sparse_structure_flow_model", (4096,)), ("shape_slat_flow_model_1024", (17859,))):
        model = random_model(name, device)
        for tokens in token_counts:
            for batch in (1, 2):
                inputs = flow_inputs(name, tokens, batch, device)
                row = {"model": name, "tokens": tokens, "batch": batch}
                for mode, graphed in (("torch", False), ("eager", False), ("auto", True)):
                    with kernel_mode(mode):
                        row[f"ms_{mode}"] = round(time_forward(model, inputs, graphed), 2)
                rows.append(row)
                log(json.dumps(row))
        del model
        torch.cuda.empty_cache()
    return rows


def profile_table(fn: Callable[[], Any], rows: int = 30) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=rows)


def profiles(device: torch.device, out: Path, log: Callable[[str], None], modes: tuple[str, ...]) -> list[str]:
    model = random_model("shape_slat_flow_model_1024", device)
    inputs = flow_inputs("shape_slat_flow_model_1024", 17859, 2, device)
    x, t, cond, kwargs = inputs
    for mode in modes:
        with kernel_mode(mode), torch.inference_mode():
            table = profile_table(lambda: model(x, t, cond, **kwargs))
        (out / f"profile_hr_flow_{mode}.txt").write_text(table)
        log(f"--- HR shape flow forward, 2 x 17859 tokens, kernels {mode}\n" + "\n".join(table.splitlines()[:22]))
    del model, inputs, x, cond, kwargs
    torch.cuda.empty_cache()
    return [f"profile_hr_flow_{mode}.txt" for mode in modes]


def decoder_trace(bench: Bench, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One 1024_cascade figure run with hooks on every decoder block: GPU time and peak allocated memory of each
    (synchronised; diagnostic only), summed per decoder pass, level and block type."""
    records: list[tuple[str, float, float]] = []

    def mark(name: str) -> Callable[..., None]:
        def hook(*_args: Any) -> None:
            torch.cuda.synchronize()
            records.append((name, time.perf_counter(), torch.cuda.max_memory_allocated() / 2**30))
            torch.cuda.reset_peak_memory_stats()
        return hook

    handles = []
    for dec_name in ("shape_slat_decoder", "tex_slat_decoder"):
        decoder = bench.models[dec_name]
        handles.append(decoder.register_forward_pre_hook(mark(f"{dec_name[:5]} start")))
        handles.append(decoder.register_forward_hook(mark(f"{dec_name[:5]} end (head, mesh)")))
        for level, stage in enumerate(decoder.blocks):
            for block in stage:
                handles.append(block.register_forward_hook(mark(f"{dec_name[:5]} L{level} {type(block).__name__}")))
    try:
        with kernel_mode("auto"):
            bench.run("1024_cascade", "gpu", 1, "auto", "figure")
    finally:
        for handle in handles:
            handle.remove()
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    passes, previous = 0, None
    for name, stamp, peak in records:
        if name.endswith("start"):
            passes += 1
        elif previous is not None:
            row = rows.setdefault((passes, name), {"pass": passes, "block": name, "calls": 0, "seconds": 0.0,
                                                   "peak_gib": 0.0})
            row["calls"] += 1
            row["seconds"] += stamp - previous
            row["peak_gib"] = max(row["peak_gib"], peak)
        previous = stamp
    table = sorted(rows.values(), key=lambda r: (r["pass"], r["block"]))
    log("decoder trace (pass 0: cascade upsample):\n" + "\n".join(
        f"  {r['pass']} {r['block']:<40} x{r['calls']:<3} {r['seconds']:7.3f} s  peak {r['peak_gib']:6.2f} GiB"
        for r in table))
    return table


def run_pipelines(bench: Bench, plan: list[tuple], out: Path, started: float, budget: float,
                  log: Callable[[str], None], env: dict) -> list:
    results = []
    for pipeline, memory, runs, kernels, structure, asset in plan:
        if time.perf_counter() - started > budget:
            log(f"skipped (budget): {pipeline} {memory} {kernels} {structure}")
            continue
        try:
            with kernel_mode(kernels):
                result = bench.run(pipeline, memory, runs, kernels, structure, asset)
        except Exception:  # one failing configuration must not lose the others' numbers
            log(f"FAILED {pipeline} {memory} {kernels} {structure}\n{traceback.format_exc()}")
            continue
        results.append(result)
        log(format_result(result))
        (out / "pipelines.json").write_text(json.dumps(to_json(env, results), indent=1))
    return results


PLAN = [  # pipeline, memory, runs, kernels, structure, asset; most important first (the budget may cut the tail)
    ("512", "gpu", 2, "auto", "figure", False),
    ("1024_cascade", "gpu", 2, "auto", "figure", False),
    ("1024_cascade", "gpu", 1, "torch", "figure", False),
    ("1536_cascade", "gpu", 1, "auto", "figure", False),
    ("1024_cascade", "offload", 1, "auto", "figure", False),
    ("1024_cascade", "gpu", 1, "auto", "calibrated", False),
    ("1024_cascade", "gpu", 1, "torch", "calibrated", False),
    ("512", "gpu", 1, "torch", "figure", False),
    ("1024_cascade", "gpu", 1, "auto", "teapot", False),
    ("1024_cascade", "gpu", 1, "eager", "figure", False),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu_full_size"))
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no new item starts")
    parser.add_argument("--skip", nargs="*", default=[], choices=["flows", "profiles", "pipelines", "trace"])
    parser.add_argument("--profile-modes", nargs="*", default=["torch", "eager"], choices=["torch", "eager"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log_file = (args.out / "log.txt").open("a")

    def log(text: str) -> None:
        line = f"[{time.perf_counter() - started:6.1f}s] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    device = torch.device("cuda")
    env = environment(device)
    log(json.dumps(env))
    report: dict[str, Any] = {"environment": env}
    items = (("flows", lambda: bench_flows(device, log)),
             ("profiles", lambda: profiles(device, args.out, log, tuple(args.profile_modes))))
    for item, fn in items:
        if item in args.skip:
            continue
        try:
            report[item] = fn()
        except Exception:
            log(f"FAILED {item}\n{traceback.format_exc()}")
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if "pipelines" not in args.skip:
        bench = Bench(device)
        log(f"models built at {time.perf_counter() - started:.1f}s")
        results = run_pipelines(bench, PLAN, args.out, started, args.budget, log, env)
        log("\n" + summary_table(results))
        if "trace" not in args.skip and time.perf_counter() - started < args.budget:
            try:
                report["decoder_trace"] = decoder_trace(bench, log)
            except Exception:
                log(f"FAILED decoder trace\n{traceback.format_exc()}")
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
