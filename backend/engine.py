"""What jobs run on: the TRELLIS.2 pipeline and the asset step behind one small interface, loaded once.

The server's worker knows jobs, not models: it gives an Engine flat settings (the settings schema's names, checked at
submit) and the job's inputs, and gets back an O-Voxel, a textured mesh, or textures baked onto a caller's mesh
(texturing), reporting progress through the stages the engine plans for that job. Everything a user can act on comes out as a `backend.errors.JobFailure`; a raise from the
progress callback (`StopRequested`) passes through unchanged. This module may import torch; the server imports it
only when it starts the worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch

import numpy as np

from backend.asset.bake_onto import BAKE_STAGES, BakedTextures, bake_onto
from backend.asset.postprocess import asset_stages, build_textured_mesh
from backend.asset.textured_mesh import AssetSettings, TexturedMesh
from backend.errors import OutOfMemory, UnsupportedSetting
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.user_mesh import UserMesh
from backend.progress import ProgressCallback, Stage
from backend.trellis2.pipeline import Trellis2Pipeline
from backend.trellis2.texturing import TEXTURING_STAGES, TexturingPipeline
from protocol.settings import DEFAULT_WEIGHTS, GENERATE, REPROCESS, TEXTURE, Schema

log = logging.getLogger(__name__)

AssetBuilder = Callable[[OVoxel, AssetSettings, ProgressCallback], TexturedMesh]
CAPABILITIES = ("cancel", "fetch", "progress", GENERATE, REPROCESS)


class Engine:
    """One loaded image pipeline and asset builder, and the texturing pipeline when the weights have one."""

    def __init__(self, pipeline: Trellis2Pipeline, build_asset: AssetBuilder, device: torch.device,
                 texturing: TexturingPipeline | None = None) -> None:
        self.pipeline = pipeline
        self.texturing = texturing
        self._build = build_asset
        self._device = device
        self.schema: Schema = pipeline.schema  # the settings schema with this checkpoint's defaults
        self.capabilities = (*CAPABILITIES, TEXTURE) if texturing is not None else CAPABILITIES

    @property
    def device(self) -> str:
        """The device in words, for people: "cuda:0 NVIDIA H200", "cpu"."""
        if self._device.type != "cuda":
            return str(self._device)
        index = self._device.index if self._device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"

    def versions(self) -> dict[str, str | None]:
        return {"torch": str(torch.__version__), "cuda": torch.version.cuda}

    def memory(self) -> tuple[int | None, int | None]:
        """(free, total) GPU bytes, or (None, None) off the GPU."""
        if self._device.type != "cuda":
            return None, None
        return torch.cuda.mem_get_info(self._device)

    def available_memory(self) -> int | None:
        """GPU bytes this process can still allocate (the driver's free memory plus what torch holds unused), or
        None off the GPU."""
        if self._device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self._device)
        return free + torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device)

    def models(self) -> list[str]:
        """The networks this engine holds (resident on the device, or visiting it per stage when offloading)."""
        return [*self.pipeline.store.models, "image_cond_model"]

    @contextlib.contextmanager
    def lane(self, measure: bool = False) -> Iterator[Callable[[], int]]:
        """Run the calling thread's GPU work on a CUDA stream of its own, so that two threads (one job's asset step,
        the next job's generation) overlap on one GPU. With `measure`, the yielded function gives the peak bytes
        allocated above the start (0 off the GPU)."""
        if self._device.type != "cuda":
            yield lambda: 0
            return
        start = torch.cuda.memory_allocated(self._device)
        if measure:
            torch.cuda.reset_peak_memory_stats(self._device)
        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            yield lambda: max(0, torch.cuda.max_memory_allocated(self._device) - start)
        stream.synchronize()

    def plan(self, kind: str, settings: Mapping[str, Any], onto_mesh: bool = False) -> tuple[Stage, ...]:
        """The stages a job of `kind` with these resolved settings reports, in order; `onto_mesh`: its textures
        are baked onto a caller's mesh (a texture job, or the reprocess of one)."""
        asset = BAKE_STAGES if onto_mesh else asset_stages(AssetSettings.from_settings(settings))
        if kind == REPROCESS:
            return asset
        if kind == TEXTURE:
            return (*TEXTURING_STAGES, *asset)
        return (*self.pipeline.stages(self.pipeline.settings(settings)), *asset)

    def generate(self, image: bytes, settings: Mapping[str, Any], progress: ProgressCallback) -> OVoxel:
        return self.pipeline.run(image, self.pipeline.settings(settings), progress)

    def texture(self, image: bytes, mesh: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                progress: ProgressCallback) -> OVoxel:
        """PBR voxels on a caller's mesh (the texture request's arrays) from an image."""
        if self.texturing is None:
            raise UnsupportedSetting("these weights have no texturing pipeline (texturing_pipeline.json)",
                                     "use weights that include it, e.g. microsoft/TRELLIS.2-4B")
        return self.texturing.texture(UserMesh.from_request(mesh), image, self.texturing.settings(settings), progress)

    def build_asset(self, ovoxel: OVoxel, settings: Mapping[str, Any], progress: ProgressCallback) -> TexturedMesh:
        with _out_of_memory_as_failure("building the mesh and textures"):
            return self._build(ovoxel, AssetSettings.from_settings(settings), progress)

    def bake(self, ovoxel: OVoxel, mesh: Mapping[str, np.ndarray], settings: Mapping[str, Any],
             progress: ProgressCallback) -> BakedTextures:
        """Textures for a caller's own triangles from its texturing O-Voxel (its UVs kept when usable)."""
        with _out_of_memory_as_failure("baking the textures"):
            return bake_onto(UserMesh.from_request(mesh), ovoxel, AssetSettings.from_settings(settings), progress,
                             device=self._device)


@contextlib.contextmanager
def _out_of_memory_as_failure(what: str) -> Iterator[None]:
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of memory while {what}: {str(exc).splitlines()[0]}",
                          "ask for a smaller texture_size (or fewer faces), or re-process the job on a machine with "
                          "more memory") from exc


def load_engine(weights: str | None, device: str | None = None, memory: str = "auto",
                build_asset: AssetBuilder | None = None) -> Engine:
    """The real engine: TRELLIS.2 from `weights` and, unless given, backend.asset.postprocess for the asset. Missing
    weight files are downloaded first, or fail within seconds with what to do (backend.weights)."""
    from backend.trellis2.checkpoint import CheckpointError
    from backend.weights import PIPELINE_CHOICES, ensure_available

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = weights or DEFAULT_WEIGHTS
    ensure_available(weights, PIPELINE_CHOICES)
    pipeline = Trellis2Pipeline.from_pretrained(weights, device=dev, memory=memory)
    try:
        texturing = TexturingPipeline.alongside(pipeline, weights)
    except CheckpointError as exc:  # weights without texturing_pipeline.json: image to 3D only
        log.info("texturing is not offered: %s", exc)
        texturing = None
    return Engine(pipeline, build_asset or partial(build_textured_mesh, device=dev), dev, texturing)
