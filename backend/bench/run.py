"""Time the whole image -> O-Voxel pipeline at full 4B size with random weights, stage by stage.

Each configuration (pipeline type, memory mode) runs `runs` times in one process; the first run pays the
one-time costs (Triton compilation, cuDNN plans, CUDA-graph capture of the structure flow) and the last is the
one reported. Stage times come from the pipeline's own progress callback, synchronised with the GPU; the
structure oracle's own work (backend/bench/oracle.py) is measured and left out of them.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.bench.full_size import MODELS, calibrate, random_conditioner, random_model, random_pipeline
from backend.bench.objects import OBJECTS
from backend.bench.oracle import StructureOracle, SubdivisionState, subdivision_oracle
from backend.trellis2.cuda_graphs import CAPTURE_STATS
from backend.trellis2.pipeline import GenerationSettings, choose_offload, model_bytes
from backend.trellis2.ss_decoder import UpsampleBlock3d

GIB = 2**30


@dataclass
class RunResult:
    pipeline: str
    memory: str
    structure: str
    kernels: str
    seconds: float
    stages: dict[str, float]
    stage_peaks_gib: dict[str, float]  # peak allocated GPU memory during each stage
    peak_allocated_gib: float
    peak_reserved_gib: float
    weights_gib: float
    lr_tokens: int
    hr_tokens: int
    voxels: int
    faces: int
    resolution: int
    oracle_seconds: float
    first_run_seconds: float
    graphs_captured: int
    capture_seconds: float
    asset_seconds: float | None = None
    asset_error: str | None = None
    runs: list[float] = field(default_factory=list)


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "memory_gib": round(props.total_memory / GIB, 1), "driver": driver_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton_version, "date": time.strftime("%Y-%m-%d")}


def disc_image(size: int = 768) -> Image.Image:
    """An RGBA disc: a foreground with transparent surroundings, so preprocessing needs no background model."""
    rgba = np.zeros((size, size, 4), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    rgba[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2] = (180, 120, 60, 255)
    return Image.fromarray(rgba, "RGBA")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One set of random models (full size unless `configs` says otherwise), reused by every configuration."""

    def __init__(self, device: torch.device, configs: dict[str, tuple[str, dict[str, Any]]] = MODELS,
                 conditioner: torch.nn.Module | None = None) -> None:
        torch.manual_seed(0)
        self.device = device
        self.models = {name: random_model(name, device, configs) for name in configs}
        self.conditioner = conditioner if conditioner is not None else random_conditioner(device)
        self.image = disc_image()
        self.calibrated = False
        # The structure flow's grid times the decoder's upsampling, and the first shape flow's latent grid.
        upsamplings = sum(isinstance(m, UpsampleBlock3d) for m in self.models["sparse_structure_decoder"].modules())
        self.ss_grid = self.models["sparse_structure_flow_model"].resolution << upsamplings
        self.lr_grid = self.models["shape_slat_flow_model_512"].resolution

    def run(self, pipeline_type: str, memory: str, runs: int, kernels: str, structure: str,
            asset: bool = False) -> RunResult:
        """Time `runs` runs of one configuration (the caller sets the kernel mode; `kernels` labels it)."""
        if structure != "calibrated" and structure not in OBJECTS:
            raise ValueError(f"structure must be 'calibrated' or one of {sorted(OBJECTS)}, got {structure!r}")
        models = dict(self.models)
        shape_decoder = models["shape_slat_decoder"]
        state = None
        if structure == "calibrated":
            if not self.calibrated:  # the oracle ignores the biases calibration shifts, so this is done once
                calibrate(self.models, self.device)
                self.calibrated = True
        else:
            obj = OBJECTS[structure]()
            ss_voxels = obj.structure(self.ss_grid)
            lr_tokens = int(torch.unique(ss_voxels.long() // (self.ss_grid // self.lr_grid), dim=0).shape[0])
            models["sparse_structure_decoder"] = StructureOracle(models["sparse_structure_decoder"], ss_voxels,
                                                                 self.ss_grid)
            state = SubdivisionState(obj, lr_tokens, self.lr_grid, shape_decoder)
        offload = choose_offload(memory, self.device, model_bytes(models))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that reserved memory is this configuration's, not left from the last
        pipe = random_pipeline(models, self.conditioner, self.device, offload)
        settings = pipe.settings({"pipeline_type": pipeline_type, "seed": 1})
        with subdivision_oracle(shape_decoder, state) if state is not None else contextlib.nullcontext():
            results = [self._timed(pipe, settings, state) for _ in range(max(1, runs))]
        last = results[-1]
        out = RunResult(
            pipeline=pipeline_type, memory="offload" if offload else "gpu", structure=structure,
            kernels=kernels, seconds=last["seconds"], stages=last["stages"], stage_peaks_gib=last["stage_peaks"],
            peak_allocated_gib=last["peak_allocated"] / GIB, peak_reserved_gib=last["peak_reserved"] / GIB,
            weights_gib=((0 if offload else model_bytes(models)) + model_bytes({"c": self.conditioner.model})) / GIB,
            lr_tokens=last["lr_tokens"], hr_tokens=last["ovoxel"].metadata["tokens"],
            voxels=int(last["ovoxel"].coords.shape[0]), faces=int(last["ovoxel"].faces.shape[0]),
            resolution=last["ovoxel"].resolution, oracle_seconds=last["oracle"],
            first_run_seconds=results[0]["seconds"], graphs_captured=sum(r["graphs"] for r in results),
            capture_seconds=sum(r["capture_seconds"] for r in results), runs=[r["seconds"] for r in results],
        )
        if asset:
            out.asset_seconds, out.asset_error = self._asset(last["ovoxel"])
        return out

    def _timed(self, pipe: Any, settings: GenerationSettings, state: SubdivisionState | None) -> dict[str, Any]:
        timeline: list[tuple[str, float, float, tuple[int, int]]] = []
        cuda = self.device.type == "cuda"

        def peak_since_last() -> tuple[int, int]:
            """(allocated, reserved) peaks since the previous call."""
            if not cuda:
                return 0, 0
            peak = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak

        def progress(stage: str, step: int, total: int) -> None:
            _sync(self.device)
            timeline.append((stage, time.perf_counter(), state.seconds if state is not None else 0.0,
                             peak_since_last()))

        if state is not None:
            state.seconds = 0.0
        graphs, capture = CAPTURE_STATS["graphs"], CAPTURE_STATS["seconds"]
        _sync(self.device)
        peak_since_last()
        start = time.perf_counter()
        ovoxel = pipe.run(self.image, settings, progress)
        _sync(self.device)
        seconds = time.perf_counter() - start
        stages: dict[str, float] = {}
        peaks: dict[str, tuple[int, int]] = {}
        previous, previous_oracle = start, 0.0
        for stage, stamp, oracle, peak in timeline:  # the time (and memory) before an event belongs to its stage
            stages[stage] = stages.get(stage, 0.0) + (stamp - previous) - (oracle - previous_oracle)
            peaks[stage] = tuple(map(max, peaks.get(stage, (0, 0)), peak))
            previous, previous_oracle = stamp, oracle
        oracle_total = timeline[-1][2] if timeline else 0.0
        stages["ovoxel"] = seconds - (previous - start) - (oracle_total - previous_oracle)  # after the last event
        peaks["ovoxel"] = peak_since_last()
        return {"seconds": seconds - oracle_total, "stages": stages, "ovoxel": ovoxel, "oracle": oracle_total,
                "stage_peaks": {k: v[0] / GIB for k, v in peaks.items()},
                "peak_allocated": max(v[0] for v in peaks.values()),
                "peak_reserved": max(v[1] for v in peaks.values()),
                "lr_tokens": state.lr_tokens if state is not None else -1,
                "graphs": CAPTURE_STATS["graphs"] - graphs, "capture_seconds": CAPTURE_STATS["seconds"] - capture}

    def _asset(self, ovoxel: Any) -> tuple[float | None, str | None]:
        """The asset step at the web app's defaults (500k faces, 2048² textures), or why it failed."""
        from backend.asset.postprocess import build_textured_mesh
        from backend.asset.textured_mesh import AssetSettings

        try:
            _sync(self.device)
            start = time.perf_counter()
            build_textured_mesh(ovoxel, AssetSettings(faces=500_000, texture_size=2048), device=self.device)
            _sync(self.device)
            return time.perf_counter() - start, None
        except Exception as exc:  # a broken asset step is reported, not allowed to end the benchmark
            return None, f"{type(exc).__name__}: {exc}"


def format_result(r: RunResult) -> str:
    lines = [f"{r.pipeline} | memory {r.memory} | kernels {r.kernels} | structure {r.structure}: "
             f"{r.seconds:.2f} s (runs: {', '.join(f'{s:.2f}' for s in r.runs)})"]
    lines.append(f"  {'stage':<18}{'seconds':>9}{'peak GiB':>10}")
    lines += [f"  {stage:<18}{sec:>9.3f}{r.stage_peaks_gib.get(stage, 0.0):>10.2f}" for stage, sec in r.stages.items()]
    lines.append(f"  peak GPU memory {r.peak_allocated_gib:.2f} GiB allocated, {r.peak_reserved_gib:.2f} GiB reserved "
                 f"(weights resident {r.weights_gib:.2f} GiB)")
    lines.append(f"  tokens LR {r.lr_tokens}, HR {r.hr_tokens}; {r.voxels} voxels at {r.resolution}^3, {r.faces} faces")
    lines.append(f"  CUDA graphs captured {r.graphs_captured} in {r.capture_seconds:.2f} s (over all runs); "
                 f"structure oracle {r.oracle_seconds:.3f} s (excluded)")
    if r.asset_seconds is not None or r.asset_error:
        lines.append("  asset step (500k faces, 2048²): "
                     + (f"{r.asset_seconds:.2f} s" if r.asset_error is None else f"failed: {r.asset_error}"))
    return "\n".join(lines)


def to_json(env: dict[str, Any], results: list[RunResult]) -> dict[str, Any]:
    return {"environment": env, "results": [asdict(r) for r in results]}


def summary_table(results: list[RunResult]) -> str:
    """One Markdown row per configuration."""
    head = ("| pipeline | memory | kernels | seconds | peak GiB (alloc / reserved) | LR / HR tokens | voxels |\n"
            "| --- | --- | --- | ---: | ---: | ---: | ---: |")
    rows = [f"| {r.pipeline} | {r.memory} | {r.kernels} | {r.seconds:.2f} | {r.peak_allocated_gib:.2f} / "
            f"{r.peak_reserved_gib:.2f} | {r.lr_tokens} / {r.hr_tokens} | {r.voxels} |" for r in results]
    return "\n".join([head, *rows])
