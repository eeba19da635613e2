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
from backend.trellis2.checkpoint import CheckpointError, load_pipeline_models, read_pipeline_config
from backend.trellis2.cuda_graphs import drop_graphs
from backend.trellis2.pipeline_types import (ALWAYS_LOADED, CONDITION, DECODE, PIPELINE_TYPES, SHAPE,
                                             SHAPE_HR, SHAPE_LR, SPARSE_STRUCTURE, TEXTURE, UPSAMPLE, Grids,
                                             PipelineType)
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
from protocol.settings import DEFAULT_WEIGHTS, GENERATE, SETTINGS, Schema, sampler_setting_name, sampler_values

log = logging.getLogger(__name__)

# Activation headroom kept free when deciding whether every model can stay on the GPU at once. Measured on an
# H200 (docs/benchmarks.md, 2026-12-04): a T.png-like object peaks 4.0 GiB over the weights in 1024_cascade and
# 7.6 GiB in 1536_cascade; the rest is margin for the allocator's fragmentation.
GPU_HEADROOM_BYTES = 12 * 2**30

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


def checkpoint_sampler_defaults(args: Mapping[str, Any], stage_samplers: Mapping[str, str]) -> dict[str, Any]:
    """The settings schema's sampler settings as a pipeline JSON's own sampler `params` give them, per stage."""
    defaults: dict[str, Any] = {}
    for stage, key in stage_samplers.items():
        params = SamplerParams.from_params(args[key]["params"])
        for name in ("steps", "guidance_strength", "guidance_rescale", "rescale_t"):
            defaults[sampler_setting_name(stage, name)] = getattr(params, name)
        defaults[sampler_setting_name(stage, "guidance_interval_start")] = params.guidance_interval[0]
        defaults[sampler_setting_name(stage, "guidance_interval_end")] = params.guidance_interval[1]
    return defaults


def check_grids(models: Mapping[str, nn.Module], stems: Mapping[str, str], grids: Grids) -> None:
    """Refuse flows whose checkpoint declares another grid than the reference's table: the pipeline would run at
    the table's size while the flow was trained for another."""
    for name, model in models.items():
        expected = grids.declared(name)
        if expected is not None and getattr(model, "resolution", expected) != expected:
            raise CheckpointError(f"{stems[name]}.json declares resolution {model.resolution}, but TRELLIS.2 runs "
                                  f"{name} on a {expected}^3 latent grid; the checkpoint does not match the "
                                  "reference pipeline (use the official microsoft/TRELLIS.2-4B files)")


class ModelStore:
    """Owns the loaded networks and where they live. In "offload" mode a model visits the GPU only while used:
    its weights stay in pinned host memory (copied in at ~20x the speed of pageable memory) and, since weights
    never change, leaving the GPU only points the model back at those host copies."""

    def __init__(self, models: dict[str, nn.Module], device: torch.device, offload: bool) -> None:
        self.models: dict[str, nn.Module] = {}
        self.device, self.offload = device, offload
        self.host: dict[str, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
        for name, model in models.items():
            self.add(name, model)

    def add(self, name: str, model: nn.Module) -> None:
        """Keep one more model, placed as the store's mode says (another pipeline sharing this store loads only the
        models it lacks)."""
        self.models[name] = model
        if not self.offload:
            model.to(self.device)
            return
        pin = self.device.type == "cuda"
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

    @classmethod
    def placed(cls, models: dict[str, nn.Module], device: str | torch.device | None, memory: str) -> ModelStore:
        """The models on `device` (default: CUDA if there is one), resident or offloaded as the memory mode decides
        (see `choose_offload`)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        offload = choose_offload(memory, device, model_bytes(models))
        log.info("device %s, %s", device, "offloading models between stages" if offload else "all models resident")
        return cls(models, device, offload)

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


def load_placed(weights: str, config: dict[str, Any], names: list[str], device: str | torch.device | None,
                memory: str, remover: Any | None) -> tuple[ModelStore, Any, Any]:
    """(store, conditioner, remover) for a pipeline: the models `names` of `weights` read, checked against the
    grid table and placed as `memory` says, the DINOv3 conditioner on the store's device, and `remover` or else
    the background remover the weights name."""
    from backend.trellis2.background import LazyRemover
    from backend.trellis2.image_cond import DinoV3Conditioner

    args = config["args"]
    models = load_pipeline_models(weights, names, "cpu", config)
    check_grids(models, args["models"], Grids.of(args))
    conditioner = DinoV3Conditioner.for_pipeline(weights, args)
    store = ModelStore.placed(models, device, memory)
    conditioner.to(store.device)
    return store, conditioner, remover or LazyRemover.for_pipeline(weights, args)


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
        # The settings schema with this checkpoint's own defaults (pipeline type, per-stage sampler params).
        defaults = {"pipeline_type": args.get("default_pipeline_type", "1024_cascade"),
                    **checkpoint_sampler_defaults(args, STAGE_SAMPLERS)}
        self.schema: Schema = SETTINGS.with_defaults(defaults)
        self.shape_norm, self.tex_norm = Normalization.of_latents(args)
        self.grids = Grids.of(args)
        self.stems: dict[str, str] = dict(args.get("models", {}))  # checkpoint stem of each model

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
        config = read_pipeline_config(weights)
        stems = config["args"]["models"]
        wanted_types = pipeline_types or tuple(
            name for name, pt in PIPELINE_TYPES.items() if all(m in stems for m in pt.models)
        )
        names = list(ALWAYS_LOADED)
        for name in wanted_types:
            names += [m for m in PIPELINE_TYPES[name].models if m not in names]
        store, conditioner, remover = load_placed(weights, config, names, device, memory, remover)
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
        from backend.trellis2.preprocess import prepared_image

        type_name = settings.pipeline_type
        if type_name not in self.pipeline_types:
            raise UnsupportedSetting(f"pipeline type {type_name!r} is not loaded in this backend",
                                     f"use one of {sorted(self.pipeline_types)}")
        ptype = self.pipeline_types[type_name]
        params = settings.samplers
        device = self.store.device

        def stepper(stage: Stage) -> Callable[[int, int], None]:
            return lambda step, total: progress(stage.name, step, total)

        img = prepared_image(image, settings.remove_background, self.remover, progress)

        progress(CONDITION.name, 0, 1)
        cond_lr = self.conditioner.features(img, 512).to(device)
        cond_hr = cond_lr if ptype.cond_resolution == 512 else self.conditioner.features(img, ptype.cond_resolution).to(device)
        progress(CONDITION.name, 1, 1)

        noise = seeded_noise(settings.seed)
        structure_grid = self.grids.latent_grid(ptype.shape_models[0])
        with self.store.use("sparse_structure_flow_model") as flow, self.store.use("sparse_structure_decoder") as dec:
            coords = sample_sparse_structure(flow, dec, cond_lr, structure_grid, params["sparse_structure"],
                                             noise, stepper(SPARSE_STRUCTURE))
        if coords.shape[0] == 0:
            raise NoSurface("the sparse structure stage found no occupied voxel")

        if len(ptype.shape_models) == 1:
            with self.store.use(ptype.shape_models[0]) as flow:
                shape_slat = sample_shape_slat(flow, cond_hr, coords, params["shape"], self.shape_norm, noise,
                                               stepper(SHAPE))
            resolution = self.grids.asset_resolution(ptype.shape_models[0])
        else:
            lr_name, hr_name = ptype.shape_models
            with self.store.use(lr_name) as flow:
                lr_slat = sample_shape_slat(flow, cond_lr, coords, params["shape"], self.shape_norm, noise,
                                            stepper(SHAPE_LR))
            lr_resolution = self.grids.asset_resolution(lr_name)
            progress(UPSAMPLE.name, 0, 1)
            with self.store.use("shape_slat_decoder") as dec:
                hr_raw = upsample_lr_shape(dec, lr_slat)
            hr_base = self.grids.asset_resolution(hr_name)
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
