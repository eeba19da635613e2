"""TRELLIS.2 image-to-3D: one image and settings in, one O-Voxel asset out (spec §5–§6).

`Trellis2Pipeline.from_pretrained(weights)` reads the hub layout (pipeline.json + ckpts/), `run(image, settings,
progress)` generates. `progress(stage, step, total)` is called between steps; raising `JobCancelled` (or any
exception) from it stops the job there. Models are kept on the GPU when they fit and otherwise moved in for their
stage only (the reference's low-VRAM behaviour); `memory="auto"` picks from free GPU memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from backend.ovoxel.ovoxel import OVoxel
from backend.trellis2.checkpoint import load_pipeline_models, read_pipeline_config
from backend.trellis2.cuda_graphs import drop_graphs
from backend.trellis2.sampler import SamplerParams
from backend.trellis2.stages import (
    Normalization,
    cascade_coords,
    sample_shape_slat,
    sample_sparse_structure,
    sample_texture_slat,
    seeded_noise,
    upsample_lr_shape,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
DEFAULT_WEIGHTS = "microsoft/TRELLIS.2-4B"
# Activation headroom kept free when deciding whether every model can stay on the GPU at once. Measured on an
# H200 (docs/benchmarks.md, 2026-12-04): a T.png-like object peaks 4.0 GiB over the weights in 1024_cascade and
# 7.6 GiB in 1536_cascade; the rest is margin for the allocator's fragmentation.
GPU_HEADROOM_BYTES = 12 * 2**30


class JobCancelled(Exception):
    """Raised from a progress callback to stop a job between steps."""


class PipelineError(RuntimeError):
    """A generation that cannot proceed; `hint` tells the user what to change."""

    def __init__(self, code: str, message: str, hint: str) -> None:
        super().__init__(f"{message} ({hint})")
        self.code, self.message, self.hint = code, message, hint


@dataclass(frozen=True)
class PipelineType:
    """Which flows a pipeline type chains. Grid sizes come from the flows' own `resolution` (latent grid: 32 for the
    512 flows, 64 for the 1024 ones), so a tiny test checkpoint with smaller grids runs the same code paths:
    the structure is read at the first shape flow's grid, the asset resolution is the last shape flow's grid × 16
    (× `upscale` for the 1536 cascade), and conditioning for the HR shape and texture stages is at `cond_resolution`.
    """

    shape_models: tuple[str, ...]  # one flow, or (LR flow, HR flow) for a cascade
    tex_model: str
    cond_resolution: int
    upscale: float = 1.0


PIPELINE_TYPES = {
    "512": PipelineType(("shape_slat_flow_model_512",), "tex_slat_flow_model_512", 512),
    "1024": PipelineType(("shape_slat_flow_model_1024",), "tex_slat_flow_model_1024", 1024),
    "1024_cascade": PipelineType(("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
                                 "tex_slat_flow_model_1024", 1024),
    "1536_cascade": PipelineType(("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
                                 "tex_slat_flow_model_1024", 1024, upscale=1.5),
}
STAGE_SAMPLERS = {
    "sparse_structure": "sparse_structure_sampler",
    "shape": "shape_slat_sampler",
    "texture": "tex_slat_sampler",
}


@dataclass(frozen=True)
class GenerationSettings:
    """What a caller may choose per job; sampler overrides are merged over pipeline.json's params."""

    pipeline_type: str | None = None
    seed: int = 42
    sparse_structure_sampler: dict[str, Any] = field(default_factory=dict)
    shape_sampler: dict[str, Any] = field(default_factory=dict)
    texture_sampler: dict[str, Any] = field(default_factory=dict)
    max_num_tokens: int = 49152
    preprocess: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationSettings:
        """Validate untrusted settings (from the wire or the CLI); errors name the field and the fix."""
        valid = {f.name for f in fields(cls)}
        unknown = set(raw) - valid
        if unknown:
            raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; valid: {sorted(valid)}")
        settings = cls(**raw)
        if settings.pipeline_type is not None and settings.pipeline_type not in PIPELINE_TYPES:
            raise ValueError(f"pipeline_type {settings.pipeline_type!r} is not one of {sorted(PIPELINE_TYPES)}")
        if not isinstance(settings.seed, int) or not 0 <= settings.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {settings.seed!r}")
        if not isinstance(settings.preprocess, bool):
            raise ValueError(f"preprocess must be true or false, got {settings.preprocess!r}")
        if not isinstance(settings.max_num_tokens, int) or settings.max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be a positive integer, got {settings.max_num_tokens!r}")
        for name in ("sparse_structure_sampler", "shape_sampler", "texture_sampler"):
            if not isinstance(getattr(settings, name), dict):
                raise ValueError(f"{name} must be a mapping of sampler settings")
            SamplerParams().merged(getattr(settings, name))  # raises on bad keys/values
        return settings


class ModelStore:
    """Owns the loaded networks and where they live. In "offload" mode a model visits the GPU only while used:
    its weights stay in pinned host memory (copied in at ~20x the speed of pageable memory) and, since weights
    never change, leaving the GPU only points the model back at those host copies."""

    def __init__(self, models: dict[str, nn.Module], device: torch.device, offload: bool) -> None:
        self.models, self.device, self.offload = models, device, offload
        self.host: dict[str, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
        if not offload:
            for model in models.values():
                model.to(device)
            return
        pin = device.type == "cuda"
        for name, model in models.items():
            self.host[name] = [
                (module, kind, key, _host_copy(tensor.detach(), pin))
                for module in model.modules()
                for kind in ("_parameters", "_buffers")
                for key, tensor in getattr(module, kind).items()
                if tensor is not None
            ]
            self._point_at(name, lambda host: host)

    def _point_at(self, name: str, place: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Give every parameter and buffer of model `name` the data place(host copy)."""
        for module, kind, key, host in self.host[name]:
            if kind == "_parameters":
                module._parameters[key].data = place(host)
            else:
                module._buffers[key] = place(host)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        model = self.models[name]
        if self.offload:
            self._point_at(name, lambda host: host.to(self.device, non_blocking=True, copy=True))
        try:
            yield model
        finally:
            if self.offload:
                drop_graphs(model)  # graphs hold the addresses of the weights being released
                self._point_at(name, lambda host: host)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """The tensor in host memory, page-locked when `pin` (also straight from the GPU, which is fast when pinned)."""
    if not pin:
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor)


def model_bytes(models: dict[str, nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for m in models.values() for t in [*m.parameters(), *m.buffers()])


def choose_offload(memory: str, device: torch.device, needed_bytes: int) -> bool:
    """memory: "auto" (keep everything on the GPU if it fits with headroom), "gpu" (always) or "offload"."""
    if memory not in ("auto", "gpu", "offload"):
        raise ValueError(f"memory mode must be auto, gpu or offload, got {memory!r}")
    if device.type != "cuda" or memory == "gpu":
        return False
    if memory == "offload":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return needed_bytes + GPU_HEADROOM_BYTES > free


class Trellis2Pipeline:
    def __init__(
        self,
        config: dict[str, Any],
        store: ModelStore,
        conditioner: Any,
        remover: Any | None,
        pipeline_types: dict[str, PipelineType] = PIPELINE_TYPES,
    ) -> None:
        args = config["args"]
        self.store = store
        self.conditioner = conditioner
        self.remover = remover
        self.pipeline_types = pipeline_types
        self.default_type = args.get("default_pipeline_type", "1024_cascade")
        self.sampler_params = {
            stage: SamplerParams().merged(args[key]["params"]) for stage, key in STAGE_SAMPLERS.items()
        }
        self.shape_norm = Normalization.from_config(args["shape_slat_normalization"])
        self.tex_norm = Normalization.from_config(args["tex_slat_normalization"])

    @classmethod
    def from_pretrained(
        cls,
        weights: str = DEFAULT_WEIGHTS,
        device: str | torch.device | None = None,
        memory: str = "auto",
        pipeline_types: tuple[str, ...] | None = None,
        remover: Any | None = None,
    ) -> Trellis2Pipeline:
        """Load what the given pipeline types need (default: every type the checkpoint supports).

        `remover` replaces the background remover (default: a local ONNX file the weights folder names, else the
        MIT BiRefNet through rembg; the hub's own choice, RMBG-2.0, is gated and non-commercial, so it is not used).
        """
        from backend.trellis2.background import LazyRemover
        from backend.trellis2.image_cond import DinoV3Conditioner

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = read_pipeline_config(weights)
        args = config["args"]
        stems = args["models"]
        wanted_types = pipeline_types or tuple(
            name for name, pt in PIPELINE_TYPES.items() if all(m in stems for m in (*pt.shape_models, pt.tex_model))
        )
        names = ["sparse_structure_flow_model", "sparse_structure_decoder", "shape_slat_decoder", "tex_slat_decoder"]
        for name in wanted_types:
            pt = PIPELINE_TYPES[name]
            names += [m for m in (*pt.shape_models, pt.tex_model) if m not in names]
        models = load_pipeline_models(weights, names, "cpu", config)
        cond_name = args["image_cond_model"]["args"]["model_name"]
        local_cond = Path(weights) / cond_name
        conditioner = DinoV3Conditioner.from_pretrained(str(local_cond) if local_cond.exists() else cond_name)
        if remover is None:
            rembg_args = args.get("rembg_model", {}).get("args", {})
            remover = LazyRemover(str(Path(weights) / rembg_args["model_path"]) if "model_path" in rembg_args else None)
        offload = choose_offload(memory, device, model_bytes(models))
        log.info("device %s, %s", device, "offloading models between stages" if offload else "all models resident")
        store = ModelStore(models, device, offload)
        conditioner.to(device)
        return cls(config, store, conditioner, remover, {k: PIPELINE_TYPES[k] for k in wanted_types})

    # ------------------------------------------------------------------------------------------- running
    def run(self, image: bytes | str | Path | Image.Image, settings: GenerationSettings, progress: ProgressCallback | None = None) -> OVoxel:
        try:
            with torch.inference_mode():
                return self._run(image, settings, progress or (lambda stage, step, total: None))
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise PipelineError(
                "out_of_memory",
                f"the GPU ran out of memory during generation: {str(exc).splitlines()[0]}",
                "start the backend with --memory offload, pick a smaller pipeline type (512 or 1024_cascade), "
                "or lower max_num_tokens",
            ) from exc

    def _run(self, image: Any, settings: GenerationSettings, progress: ProgressCallback) -> OVoxel:
        from backend.trellis2.preprocess import load_image, preprocess_image

        type_name = settings.pipeline_type or self.default_type
        if type_name not in self.pipeline_types:
            raise PipelineError("unsupported_pipeline_type", f"pipeline type {type_name!r} is not loaded",
                                f"use one of {sorted(self.pipeline_types)}")
        ptype = self.pipeline_types[type_name]
        params = {
            "sparse_structure": self.sampler_params["sparse_structure"].merged(settings.sparse_structure_sampler),
            "shape": self.sampler_params["shape"].merged(settings.shape_sampler),
            "texture": self.sampler_params["texture"].merged(settings.texture_sampler),
        }
        device = self.store.device

        def stepper(stage: str) -> Callable[[int, int], None]:
            return lambda step, total: progress(stage, step, total)

        progress("preprocess", 0, 1)
        img = image if isinstance(image, Image.Image) else load_image(image)
        if settings.preprocess:
            img = preprocess_image(img, self.remover)
        progress("preprocess", 1, 1)

        progress("condition", 0, 1)
        cond_lr = self.conditioner.features(img, 512).to(device)
        cond_hr = cond_lr if ptype.cond_resolution == 512 else self.conditioner.features(img, ptype.cond_resolution).to(device)
        progress("condition", 1, 1)

        noise = seeded_noise(settings.seed)
        first_shape = self.store.models[ptype.shape_models[0]]
        with self.store.use("sparse_structure_flow_model") as flow, self.store.use("sparse_structure_decoder") as dec:
            coords = sample_sparse_structure(flow, dec, cond_lr, first_shape.resolution, params["sparse_structure"],
                                             noise, stepper("sparse_structure"))
        if coords.shape[0] == 0:
            raise PipelineError("empty_structure", "the model found no object in this image",
                                "try another seed or an image with a clearly separated subject")

        if len(ptype.shape_models) == 1:
            with self.store.use(ptype.shape_models[0]) as flow:
                shape_slat = sample_shape_slat(flow, cond_hr, coords, params["shape"], self.shape_norm, noise,
                                               stepper("shape"))
                resolution = flow.resolution * 16
        else:
            lr_name, hr_name = ptype.shape_models
            with self.store.use(lr_name) as flow:
                lr_slat = sample_shape_slat(flow, cond_lr, coords, params["shape"], self.shape_norm, noise,
                                            stepper("shape_lr"))
                lr_resolution = flow.resolution * 16
            progress("upsample", 0, 1)
            with self.store.use("shape_slat_decoder") as dec:
                hr_raw = upsample_lr_shape(dec, lr_slat)
            hr_base = self.store.models[hr_name].resolution * 16
            coords, resolution = cascade_coords(hr_raw, lr_resolution, hr_base, int(hr_base * ptype.upscale),
                                                settings.max_num_tokens)
            progress("upsample", 1, 1)
            with self.store.use(hr_name) as flow:
                shape_slat = sample_shape_slat(flow, cond_hr, coords, params["shape"], self.shape_norm, noise,
                                               stepper("shape_hr"))

        with self.store.use(ptype.tex_model) as flow:
            tex_slat = sample_texture_slat(flow, cond_hr, shape_slat, params["texture"], self.shape_norm,
                                           self.tex_norm, noise, stepper("texture"))

        progress("decode", 0, 2)
        with self.store.use("shape_slat_decoder") as dec:
            dec.set_resolution(resolution)
            shape = dec(shape_slat)
        progress("decode", 1, 2)
        with self.store.use("tex_slat_decoder") as dec:
            tex = dec(tex_slat, guide_subs=shape.subs)
        progress("decode", 2, 2)
        vertices, faces = shape.meshes[0]
        if not torch.equal(shape.vertices.coords, tex.coords):
            raise RuntimeError("texture decoder voxels differ from the shape decoder's (guide_subs not followed)")
        return OVoxel(
            coords=tex.coords[:, 1:].cpu().numpy(),
            attrs=(tex.feats.float() * 0.5 + 0.5).cpu().numpy(),
            resolution=resolution,
            vertices=vertices.cpu().numpy(),
            faces=faces.cpu().numpy(),
            dual_vertices=shape.vertices.feats.float().cpu().numpy(),
            intersected=shape.intersected.feats.cpu().numpy(),
            split_weight=shape.quad_lerp.feats.float().cpu().numpy(),
            metadata={"pipeline_type": type_name, "seed": settings.seed, "tokens": int(shape_slat.feats.shape[0])},
        )
