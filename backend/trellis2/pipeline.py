"""TRELLIS.2 image-to-3D: one image and settings in, one O-Voxel asset out (spec §5–§6).

`Trellis2Pipeline.from_pretrained(weights)` reads the hub layout (pipeline.json + ckpts/), `settings(raw)` turns
a flat settings map (protocol/settings.py) into typed settings over the checkpoint's defaults, and `run(image,
settings, progress)` generates. `progress(stage, step, total)` is called between steps with the stages this module
publishes (`stages(settings)`); raising from it (`backend.progress.StopRequested`) stops the job there. Models are
kept on the GPU when they fit and otherwise moved in for their stage only (the reference's low-VRAM behaviour);
`memory="auto"` picks from free GPU memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from backend.errors import NoSurface, OutOfMemory, UnsupportedSetting
from backend.ovoxel.ovoxel import OVoxel
from backend.progress import ProgressCallback, Stage, ignore_progress
from backend.trellis2.checkpoint import load_pipeline_models, read_pipeline_config
from backend.trellis2.sampler import SamplerParams
from protocol.settings import DEFAULT_WEIGHTS, GENERATE, SETTINGS, Schema, sampler_setting_name, sampler_values
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

# Activation headroom kept free when deciding whether every model can stay on the GPU at once.
GPU_HEADROOM_BYTES = 12 * 2**30

# The stages a generation reports, with their share of a typical job's time (measured on the GPU, 1024_cascade).
PREPROCESS = Stage("preprocess", 1.0)
CONDITION = Stage("condition", 1.0)
SPARSE_STRUCTURE = Stage("sparse_structure", 9.0)
SHAPE = Stage("shape", 20.0)  # the one shape flow of a non-cascade type
SHAPE_LR = Stage("shape_lr", 10.0)
UPSAMPLE = Stage("upsample", 1.0)
SHAPE_HR = Stage("shape_hr", 40.0)
TEXTURE = Stage("texture", 22.0)
DECODE = Stage("decode", 10.0)


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

    @property
    def stages(self) -> tuple[Stage, ...]:
        shape = (SHAPE,) if len(self.shape_models) == 1 else (SHAPE_LR, UPSAMPLE, SHAPE_HR)
        return (PREPROCESS, CONDITION, SPARSE_STRUCTURE, *shape, TEXTURE, DECODE)


PIPELINE_TYPES = {
    "512": PipelineType(("shape_slat_flow_model_512",), "tex_slat_flow_model_512", 512),
    "1024": PipelineType(("shape_slat_flow_model_1024",), "tex_slat_flow_model_1024", 1024),
    "1024_cascade": PipelineType(("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
                                 "tex_slat_flow_model_1024", 1024),
    "1536_cascade": PipelineType(("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
                                 "tex_slat_flow_model_1024", 1024, upscale=1.5),
}
# pipeline.json's sampler entry for each stage whose sampler settings the schema names.
STAGE_SAMPLERS = {
    "sparse_structure": "sparse_structure_sampler",
    "shape": "shape_slat_sampler",
    "texture": "tex_slat_sampler",
}


@dataclass(frozen=True)
class GenerationSettings:
    """One generation's settings, typed. Built from the settings schema's flat map by `Trellis2Pipeline.settings`,
    which validates it and fills in the checkpoint's defaults."""

    pipeline_type: str
    seed: int
    remove_background: bool
    max_num_tokens: int
    samplers: dict[str, SamplerParams]  # by stage: sparse_structure, shape, texture

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> GenerationSettings:
        """From complete, validated flat settings (`Schema.resolve`)."""
        samplers = {}
        for stage in STAGE_SAMPLERS:
            values = sampler_values(settings, stage)
            interval = (values.pop("guidance_interval_start"), values.pop("guidance_interval_end"))
            samplers[stage] = SamplerParams(**values, guidance_interval=interval)
        return cls(settings["pipeline_type"], settings["seed"], settings["remove_background"],
                   settings["max_num_tokens"], samplers)


class ModelStore:
    """Owns the loaded networks and where they live. In "offload" mode a model visits the GPU only while used."""

    def __init__(self, models: dict[str, nn.Module], device: torch.device, offload: bool) -> None:
        self.models, self.device, self.offload = models, device, offload
        if not offload:
            for model in models.values():
                model.to(device)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        model = self.models[name]
        if self.offload:
            model.to(self.device)
        try:
            yield model
        finally:
            if self.offload:
                model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


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
        # The settings schema with this checkpoint's own defaults (pipeline type, per-stage sampler params).
        defaults: dict[str, Any] = {"pipeline_type": args.get("default_pipeline_type", "1024_cascade")}
        for stage, key in STAGE_SAMPLERS.items():
            params = SamplerParams.from_params(args[key]["params"])
            for name in ("steps", "guidance_strength", "guidance_rescale", "rescale_t"):
                defaults[sampler_setting_name(stage, name)] = getattr(params, name)
            defaults[sampler_setting_name(stage, "guidance_interval_start")] = params.guidance_interval[0]
            defaults[sampler_setting_name(stage, "guidance_interval_end")] = params.guidance_interval[1]
        self.schema: Schema = SETTINGS.with_defaults(defaults)
        self.shape_norm = Normalization.from_config(args["shape_slat_normalization"])
        self.tex_norm = Normalization.from_config(args["tex_slat_normalization"])

    def settings(self, raw: Mapping[str, Any] | None = None) -> GenerationSettings:
        """Typed settings from a flat settings map (the schema's names), over this checkpoint's defaults; raises
        protocol.InvalidSettings naming a bad setting."""
        return GenerationSettings.from_settings(self.schema.resolve(GENERATE, raw or {}))

    def stages(self, settings: GenerationSettings) -> tuple[Stage, ...]:
        return PIPELINE_TYPES[settings.pipeline_type].stages

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
    def run(self, image: bytes | str | Path | Image.Image, settings: GenerationSettings,
            progress: ProgressCallback = ignore_progress) -> OVoxel:
        """Generate. `progress(stage, step, total)` is called between steps (stage names: `self.stages(settings)`);
        whatever it raises stops the run there and comes out of here unchanged."""
        try:
            with torch.inference_mode():
                return self._run(image, settings, progress)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise OutOfMemory(
                f"the GPU ran out of memory during generation: {str(exc).splitlines()[0]}",
                "start the backend with --memory offload, pick a smaller pipeline type (512 or 1024_cascade), "
                "or lower max_num_tokens",
            ) from exc

    def _run(self, image: Any, settings: GenerationSettings, progress: ProgressCallback) -> OVoxel:
        from backend.trellis2.preprocess import load_image, preprocess_image

        type_name = settings.pipeline_type
        if type_name not in self.pipeline_types:
            raise UnsupportedSetting(f"pipeline type {type_name!r} is not loaded in this backend",
                                     f"use one of {sorted(self.pipeline_types)}")
        ptype = self.pipeline_types[type_name]
        params = settings.samplers
        device = self.store.device

        def stepper(stage: Stage) -> Callable[[int, int], None]:
            return lambda step, total: progress(stage.name, step, total)

        progress(PREPROCESS.name, 0, 1)
        img = image if isinstance(image, Image.Image) else load_image(image)
        if settings.remove_background:
            img = preprocess_image(img, self.remover)
        progress(PREPROCESS.name, 1, 1)

        progress(CONDITION.name, 0, 1)
        cond_lr = self.conditioner.features(img, 512).to(device)
        cond_hr = cond_lr if ptype.cond_resolution == 512 else self.conditioner.features(img, ptype.cond_resolution).to(device)
        progress(CONDITION.name, 1, 1)

        noise = seeded_noise(settings.seed)
        first_shape = self.store.models[ptype.shape_models[0]]
        with self.store.use("sparse_structure_flow_model") as flow, self.store.use("sparse_structure_decoder") as dec:
            coords = sample_sparse_structure(flow, dec, cond_lr, first_shape.resolution, params["sparse_structure"],
                                             noise, stepper(SPARSE_STRUCTURE))
        if coords.shape[0] == 0:
            raise NoSurface("the sparse structure stage found no occupied voxel")

        if len(ptype.shape_models) == 1:
            with self.store.use(ptype.shape_models[0]) as flow:
                shape_slat = sample_shape_slat(flow, cond_hr, coords, params["shape"], self.shape_norm, noise,
                                               stepper(SHAPE))
                resolution = flow.resolution * 16
        else:
            lr_name, hr_name = ptype.shape_models
            with self.store.use(lr_name) as flow:
                lr_slat = sample_shape_slat(flow, cond_lr, coords, params["shape"], self.shape_norm, noise,
                                            stepper(SHAPE_LR))
                lr_resolution = flow.resolution * 16
            progress(UPSAMPLE.name, 0, 1)
            with self.store.use("shape_slat_decoder") as dec:
                hr_raw = upsample_lr_shape(dec, lr_slat)
            hr_base = self.store.models[hr_name].resolution * 16
            coords, resolution = cascade_coords(hr_raw, lr_resolution, hr_base, int(hr_base * ptype.upscale),
                                                settings.max_num_tokens)
            if coords.shape[0] == 0:
                raise NoSurface("the low-resolution shape decoded to no voxel")
            progress(UPSAMPLE.name, 1, 1)
            with self.store.use(hr_name) as flow:
                shape_slat = sample_shape_slat(flow, cond_hr, coords, params["shape"], self.shape_norm, noise,
                                               stepper(SHAPE_HR))

        with self.store.use(ptype.tex_model) as flow:
            tex_slat = sample_texture_slat(flow, cond_hr, shape_slat, params["texture"], self.shape_norm,
                                           self.tex_norm, noise, stepper(TEXTURE))

        progress(DECODE.name, 0, 2)
        with self.store.use("shape_slat_decoder") as dec:
            dec.set_resolution(resolution)
            shape = dec(shape_slat)
        vertices, faces = shape.meshes[0]
        if faces.shape[0] == 0:
            raise NoSurface("the shape decoder extracted no face")
        progress(DECODE.name, 1, 2)
        with self.store.use("tex_slat_decoder") as dec:
            tex = dec(tex_slat, guide_subs=shape.subs)
        progress(DECODE.name, 2, 2)
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
