"""`python -m backend generate IMAGE [-o OUT]` and `python -m backend tiny-checkpoint DIR`.

generate runs the whole pipeline in this process, with a progress line on stderr; Ctrl-C cancels between steps.
The output is a textured GLB, or with OUT ending in .npz the O-Voxel, which `python -m backend ovoxel decode` turns
into a GLB later with other asset settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from backend.asset.textured_mesh import AssetSettings
from backend.errors import JobFailure
from backend.progress import loading_reported_to
from backend.ovoxel_cli import asset_settings
from protocol import InvalidSettings
from protocol.settings import DEFAULT_WEIGHTS, GENERATE
from protocol.settings_cli import add_setting_arguments, given_settings


class ProgressLine:
    """One self-overwriting status line: stage, step/total, percentage, elapsed time."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream, self.start = stream, time.perf_counter()
        self.tty = stream.isatty()

    def __call__(self, stage: str, step: int, total: int) -> None:
        pct = 100.0 * step / total if total else 100.0
        filled = int(pct / 5)
        text = f"{stage:<16} [{'#' * filled}{'.' * (20 - filled)}] {step}/{total} {pct:5.1f}%  {self.elapsed():6.1f}s"
        if self.tty:
            self.stream.write("\r" + text)
        elif step in (0, total):  # logs get the start and end of each stage only
            self.stream.write(text + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, message: str) -> None:
        self.stream.write(("\n" if self.tty else "") + message + "\n")
        self.stream.flush()


def run_generate(args: argparse.Namespace) -> int:
    from backend.trellis2.pipeline import Trellis2Pipeline

    output = args.output or args.image.with_suffix(".glb")
    if not args.image.is_file():
        print(f"error: image {args.image} not found", file=sys.stderr)
        return 2
    try:
        asset = asset_settings(args)
    except InvalidSettings as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2
    progress = ProgressLine(sys.stderr)

    def work() -> int:
        pipeline = load_pipeline(Trellis2Pipeline, args, progress)
        settings = pipeline.settings(given_settings(args, GENERATE))
        ovoxel = pipeline.run(args.image, settings, progress)
        progress.done(f"generated {ovoxel.coords.shape[0]} voxels, {ovoxel.faces.shape[0]} faces "
                      f"at {ovoxel.resolution}^3 in {progress.elapsed():.1f}s")
        return _write(ovoxel, output, asset, progress)

    return run_reported(work, progress)


def load_pipeline(cls, args: argparse.Namespace, progress: ProgressLine):
    """`cls.from_pretrained` with the command line's --weights, --device, --memory and --rembg, announced, each
    model read (and any download) shown on the progress line: loading takes minutes on a first run."""
    from backend.trellis2.background import LazyRemover

    print(f"loading weights from {args.weights} ...", file=sys.stderr)
    remover = LazyRemover(args.rembg) if args.rembg else None
    with loading_reported_to(lambda phase, item, done, total: progress(phase, done, total)):
        return cls.from_pretrained(args.weights, device=args.device, memory=args.memory, remover=remover)


def run_reported(work: Callable[[], int], progress: ProgressLine) -> int:
    """Run a command's work under its progress line: Ctrl-C cancels (exit 130, nothing written); a failure the user
    can act on (weights, DINOv3, image, mesh, settings, the pipeline's own) is one message with its fix (exit 1),
    no traceback."""
    from backend.trellis2.checkpoint import CheckpointError
    from backend.trellis2.image_cond import DinoV3LoadError

    try:
        return work()
    except KeyboardInterrupt:
        progress.done("cancelled; nothing was written")
        return 130
    except (CheckpointError, DinoV3LoadError) as exc:
        progress.done(f"error: {exc}")
        return 1
    except (JobFailure, InvalidSettings) as exc:
        progress.done(f"error: {exc.message}\nhint: {exc.hint}")
        return 1


def _write(ovoxel, output: Path, asset: AssetSettings, progress: ProgressLine) -> int:
    if output.suffix.lower() == ".npz":
        ovoxel.save(output)
        progress.done(f"wrote O-Voxel {output}")
        return 0
    from backend.asset.glb import write_glb
    from backend.asset.postprocess import build_textured_mesh

    mesh = build_textured_mesh(ovoxel, asset, progress)
    write_glb(mesh, output)
    progress.done(f"wrote {output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="image in, textured GLB (or O-Voxel .npz) out, in this process")
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, help="OUT.glb or OUT.npz (default: IMAGE.glb)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="hub repo id or local folder with pipeline.json")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--memory", choices=["auto", "gpu", "offload"], default="auto",
                   help="keep all models on the GPU, move each in for its stage, or decide from free memory")
    p.add_argument("--rembg", metavar="SESSION_OR_ONNX",
                   help="background remover for images without alpha: a rembg session name (default "
                        "birefnet-general, MIT) or a local .onnx file")
    add_setting_arguments(p, GENERATE)
    p.set_defaults(run=run_generate)

    p = sub.add_parser("tiny-checkpoint", help="write a tiny random checkpoint in the hub layout (for tests)")
    p.add_argument("directory", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_tiny_checkpoint)


def run_tiny_checkpoint(args: argparse.Namespace) -> int:
    from backend.trellis2.tiny import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.directory, seed=args.seed))
    return 0
