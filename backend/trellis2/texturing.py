"""TRELLIS.2 texturing (texturing.md §1.3): the caller's own mesh + an image -> PBR voxels on that mesh's surface.

`TexturingPipeline.from_pretrained(weights)` reads `texturing_pipeline.json` (hub repo or local folder) and loads
only what texturing needs: the shape encoder, the two image+shape->texture flows, the texture decoder, and DINOv3.
`texture(mesh, image, settings, progress)` is the reference's `run()` up to the bake, step by step:

1. preprocess: the image as the image pipeline does (its alpha, else background removal; crop; premultiply).
2. condition: DINOv3 features at 512 for resolution 512, else at 1024.
3. voxelize: the mesh centred on its bounding box, longest side 0.99999, voxelised by the reference voxeliser
   (exact) on the resolution's grid. The vertices are taken as Z-up (the internal frame): Blender's frame as it is;
   the reference's Y-up -> Z-up swap of glTF/OBJ/PLY files is the caller's (the CLI does it).
4. encode: the shape latent z = mean of the shape encoder (no noise drawn).
5. texture: the first draw of the seeded generator, randn(tokens, C), in the encoder's token order, sampled by
   the 512 flow (resolution 512) or the 1024 flow (1024 and 1536, where RoPE coordinates reach 95).
6. decode: the texture decoder follows the encoder's own voxel hierarchy back to exactly the voxeliser's voxels,
   in its order; channels * 0.5 + 0.5 are the 6 PBR attributes.

The result is an O-Voxel of the caller's mesh (normalised vertices, PBR attributes, its dual grid) whose metadata
holds the normalisation (`center`, `scale`: normalised = (position - center) * scale), so `backend.asset.bake_onto`
can bake it onto the caller's own triangles, now or later from a stored file. Models follow the image pipeline's
memory modes (`ModelStore`); `progress(stage, step, total)` reports the stages of `TEXTURING_STAGES`, and raising
`backend.progress.StopRequested` (or anything) from it stops the job between steps. Settings are the settings
schema's texture request (`settings(raw)`, over texturing_pipeline.json's own sampler defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.errors import OutOfMemory
from backend.ovoxel.encode import normalize_to_unit_cube
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.user_mesh import UserMesh
from backend.ovoxel.voxelizer import FlexibleDualGrid, mesh_to_flexible_dual_grid
from backend.trellis2.checkpoint import load_pipeline_models, read_pipeline_config
from backend.progress import ProgressCallback, Stage, ignore_progress
from backend.trellis2.pipeline import ModelStore, check_grids, checkpoint_sampler_defaults, load_placed
from backend.trellis2.pipeline_types import CONDITION, DECODE, PREPROCESS, TEXTURE, TEXTURING_MODELS, Grids
from backend.trellis2.sampler import SamplerParams
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.stages import Normalization, sample_texture_slat, seeded_noise
from protocol.settings import DEFAULT_WEIGHTS, SETTINGS
from protocol.settings import TEXTURE as TEXTURE_REQUEST
from protocol.settings import Schema, sampler_values

CONFIG_FILE = "texturing_pipeline.json"
# The stages `texture` reports, in order; the image pipeline's where they are the same step, with the same weights
# (shares of a job's time: the texture flow dominates).
VOXELIZE = Stage("voxelize", 3.0)
ENCODE = Stage("encode", 2.0)
TEXTURING_STAGES = (PREPROCESS, CONDITION, VOXELIZE, ENCODE, TEXTURE, DECODE)


@dataclass(frozen=True)
class TextureResolution:
    """Which flow and condition size a texturing resolution uses; the voxel grid is the resolution itself (the
    reference's `grid_size=resolution`, `Grids.texturing_grid`)."""

    flow: str
    cond_resolution: int


RESOLUTIONS = {
    512: TextureResolution("tex_slat_flow_model_512", 512),
    1024: TextureResolution("tex_slat_flow_model_1024", 1024),
    1536: TextureResolution("tex_slat_flow_model_1024", 1024),
}


@dataclass(frozen=True)
class TexturingSettings:
    """One texturing job's settings, typed; built by `TexturingPipeline.settings` from the settings schema's flat
    map (texture request), which validates them."""

    resolution: int
    seed: int
    remove_background: bool  # False: the image is used as given (no matting, crop or premultiply)
    sampler: SamplerParams

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TexturingSettings:
        values = sampler_values(settings, "texture")
        interval = (values.pop("guidance_interval_start"), values.pop("guidance_interval_end"))
        return cls(settings["resolution"], settings["seed"], settings["remove_background"],
                   SamplerParams(**values, guidance_interval=interval))


class TexturingPipeline:
    def __init__(self, config: dict[str, Any], store: ModelStore, conditioner: Any, remover: Any | None) -> None:
        args = config["args"]
        self.store, self.conditioner, self.remover = store, conditioner, remover
        # The settings schema with texturing_pipeline.json's own texture sampler params as defaults.
        self.schema: Schema = SETTINGS.with_defaults(checkpoint_sampler_defaults(args, {"texture": "tex_slat_sampler"}))
        self.shape_norm, self.tex_norm = Normalization.of_latents(args)
        self.grids = Grids.of(args)

    def settings(self, raw: Mapping[str, Any] | None = None) -> TexturingSettings:
        """Typed settings from a flat settings map; raises protocol.InvalidSettings naming a bad setting."""
        return TexturingSettings.from_settings(self.schema.resolve(TEXTURE_REQUEST, raw or {}))

    @classmethod
    def from_pretrained(
        cls,
        weights: str = DEFAULT_WEIGHTS,
        device: str | torch.device | None = None,
        memory: str = "auto",
        remover: Any | None = None,
    ) -> TexturingPipeline:
        """Load the texturing models of `weights` (hub repo id or folder with texturing_pipeline.json + ckpts/)."""
        config = read_pipeline_config(weights, CONFIG_FILE)
        return cls(config, *load_placed(weights, config, list(TEXTURING_MODELS), device, memory, remover))

    @classmethod
    def alongside(cls, image_pipeline: Any, weights: str) -> TexturingPipeline:
        """The texturing pipeline of `weights` sharing an image pipeline's models, conditioner and remover: the
        models both JSONs name with the same checkpoint (the texture flows and decoder) are used once, and only
        the rest (the shape encoder) is loaded, into the same store."""
        config = read_pipeline_config(weights, CONFIG_FILE)
        args = config["args"]
        store, shared_stems = image_pipeline.store, image_pipeline.stems
        missing = [name for name in TEXTURING_MODELS
                   if name not in store.models or shared_stems.get(name) != args["models"][name]]
        for name, model in load_pipeline_models(weights, missing, "cpu", config).items():
            store.add(name, model)
        check_grids({name: store.models[name] for name in TEXTURING_MODELS}, args["models"], Grids.of(args))
        return cls(config, store, image_pipeline.conditioner, image_pipeline.remover)

    def texture(self, mesh: UserMesh, image: bytes | str | Path | Image.Image, settings: TexturingSettings,
                progress: ProgressCallback = ignore_progress) -> OVoxel:
        """PBR voxels on `mesh`'s surface from `image` (see the module docstring for the steps)."""
        try:
            with torch.inference_mode():
                return self._texture(mesh, image, settings, progress)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise OutOfMemory(f"the GPU ran out of memory while texturing: {str(exc).splitlines()[0]}",
                              "start the backend with --memory offload, or texture at resolution 512") from exc

    def _texture(self, mesh: UserMesh, image: Any, settings: TexturingSettings,
                 progress: ProgressCallback) -> OVoxel:
        from backend.trellis2.preprocess import prepared_image

        choice = RESOLUTIONS[settings.resolution]
        device = self.store.device

        img = prepared_image(image, settings.remove_background, self.remover, progress)

        progress(CONDITION.name, 0, 1)
        cond = self.conditioner.features(img, choice.cond_resolution).to(device)
        progress(CONDITION.name, 1, 1)

        progress(VOXELIZE.name, 0, 1)
        normalized, center, scale = normalize_to_unit_cube(mesh.positions.astype(np.float64))
        resolution = self.grids.texturing_grid(settings.resolution)
        grid = voxelize(normalized, mesh.faces, resolution, device)
        progress(VOXELIZE.name, 1, 1)

        progress(ENCODE.name, 0, 1)
        with self.store.use("shape_slat_encoder") as encoder:
            shape_slat = encode_shape(encoder, grid)
        progress(ENCODE.name, 1, 1)

        with self.store.use(choice.flow) as flow:
            tex_slat = sample_texture_slat(flow, cond, shape_slat, settings.sampler, self.shape_norm, self.tex_norm,
                                           seeded_noise(settings.seed), _stepper(progress, TEXTURE))

        progress(DECODE.name, 0, 1)
        with self.store.use("tex_slat_decoder") as decoder:
            pbr = decode_texture(decoder, tex_slat)
        progress(DECODE.name, 1, 1)
        if not torch.equal(pbr.coords[:, 1:], grid.coords):
            raise RuntimeError("the texture decoder left the encoder's voxels (the voxel hierarchy was not followed)")
        return OVoxel(
            coords=grid.coords.cpu().numpy(),
            attrs=pbr.feats.float().cpu().numpy(),
            resolution=resolution,
            vertices=normalized.astype(np.float32),
            faces=mesh.faces.astype(np.int32),
            dual_vertices=grid.local().clamp(0, 1).cpu().numpy(),
            intersected=grid.intersected.cpu().numpy(),
            metadata={"kind": "texturing", "center": [float(c) for c in center], "scale": float(scale),
                      "seed": settings.seed, "resolution_setting": settings.resolution,
                      "tokens": int(shape_slat.feats.shape[0])},
        )


def voxelize(normalized: np.ndarray, faces: np.ndarray, resolution: int, device: torch.device) -> FlexibleDualGrid:
    """The reference's voxelisation of a normalised mesh (float64 vertices, cast to float32 as it does)."""
    return mesh_to_flexible_dual_grid(torch.from_numpy(normalized).float().to(device),
                                      torch.from_numpy(np.asarray(faces)).to(device), resolution)


def encode_shape(encoder: torch.nn.Module, grid: FlexibleDualGrid) -> SparseTensor:
    """The shape latent of a dual grid (one batch item): encoder(dual_vertices * res - voxel_indices, flags)."""
    coords = torch.cat([torch.zeros_like(grid.coords[:, :1]), grid.coords], dim=1)
    dual = SparseTensor(grid.local(), coords)
    return encoder(dual, dual.replace(grid.intersected))


def decode_texture(decoder: torch.nn.Module, tex_slat: SparseTensor) -> SparseTensor:
    """The 6 PBR attributes (decoder output * 0.5 + 0.5) on the voxels of the encoder's hierarchy (so on the
    voxeliser's voxels, in its order)."""
    pbr = decoder(tex_slat)
    return pbr.replace(pbr.feats * 0.5 + 0.5)


def _stepper(progress: ProgressCallback, stage: Stage) -> Callable[[int, int], None]:
    return lambda step, total: progress(stage.name, step, total)
