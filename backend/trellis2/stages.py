"""The generation stages of TRELLIS.2 as plain functions of (models, conditions, noise) — spec §6.

Kept apart from the pipeline object so each stage can be replayed from recorded inputs (the `pipeline_glue`
golden kind) and so nothing here knows about loading, devices or progress reporting beyond a step callback.
Noise comes from a `NoiseSource`: the reference draws every noise tensor from the CPU generator in a fixed order
(SS, [LR shape], shape, texture), so a seeded CPU generator reproduces its seeds exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from backend.trellis2.cuda_graphs import captured_graphs
from backend.trellis2.sampler import FlowEulerGuidanceSampler, SamplerParams, StepCallback
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.ss_decoder import occupied_coords

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]


def seeded_noise(seed: int) -> NoiseSource:
    """Standard normal draws from a private CPU generator: the same values as the reference's
    `torch.manual_seed(seed)` + `torch.randn`, without touching the process-wide generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator)


@dataclass(frozen=True)
class Normalization:
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]

    @classmethod
    def from_config(cls, cfg: dict) -> Normalization:
        return cls(torch.tensor(cfg["mean"], dtype=torch.float32), torch.tensor(cfg["std"], dtype=torch.float32))

    @classmethod
    def of_latents(cls, args: dict) -> tuple[Normalization, Normalization]:
        """(shape, texture) latent normalisations of a pipeline JSON's args (both pipelines share them)."""
        return cls.from_config(args["shape_slat_normalization"]), cls.from_config(args["tex_slat_normalization"])

    def denormalize(self, x: SparseTensor) -> SparseTensor:
        return x.replace(x.feats * self.std.to(x.device) + self.mean.to(x.device))

    def normalize(self, x: SparseTensor) -> SparseTensor:
        return x.replace((x.feats - self.mean.to(x.device)) / self.std.to(x.device))


SAMPLER = FlowEulerGuidanceSampler(sigma_min=1e-5)


@torch.inference_mode()
def sample_sparse_structure(
    flow: nn.Module,
    decoder: nn.Module,
    cond: torch.Tensor,
    resolution: int,
    params: SamplerParams,
    noise: NoiseSource,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Occupied voxels, int32 [N, 4] (batch, x, y, z) in lexicographic order, at `resolution`³ (32 or 64)."""
    device = cond.device
    r = flow.resolution
    z = noise((cond.shape[0], flow.in_channels, r, r, r)).to(device)
    with captured_graphs(flow, keep=True):  # 4096 tokens per item whatever the image: graphs serve every job
        z = SAMPLER.sample(flow, z, cond, torch.zeros_like(cond), params, on_step).samples
    return occupied_coords(decoder(z), resolution)


@torch.inference_mode()
def sample_shape_slat(
    flow: nn.Module,
    cond: torch.Tensor,
    coords: torch.Tensor,
    params: SamplerParams,
    normalization: Normalization,
    noise: NoiseSource,
    on_step: StepCallback | None = None,
) -> SparseTensor:
    """The (denormalised) shape latent on `coords`."""
    x = SparseTensor(noise((coords.shape[0], flow.in_channels)).to(cond.device), coords)
    with captured_graphs(flow):
        out = SAMPLER.sample(flow, x, cond, torch.zeros_like(cond), params, on_step).samples
    return normalization.denormalize(out)


def cascade_coords(
    hr_coords: torch.Tensor, lr_resolution: int, hr_base_resolution: int, target_resolution: int, max_num_tokens: int
) -> tuple[torch.Tensor, int]:
    """Quantise the LR decoder's fine voxels onto the HR latent grid (latent cell = 16 voxels), stepping the
    resolution down by an eighth of the HR flow's base resolution (128 for 1024) while the token count reaches
    `max_num_tokens`; at the base resolution the limit no longer applies (the reference's `== 1024` rule)."""
    hr_resolution = target_resolution
    while True:
        cells = ((hr_coords[:, 1:] + 0.5) / lr_resolution * (hr_resolution // 16)).int()
        coords = torch.cat([hr_coords[:, :1], cells], dim=1).unique(dim=0)
        if coords.shape[0] < max_num_tokens or hr_resolution <= hr_base_resolution:
            return coords, hr_resolution
        hr_resolution -= hr_base_resolution // 8


@torch.inference_mode()
def upsample_lr_shape(shape_decoder: nn.Module, lr_slat: SparseTensor) -> torch.Tensor:
    """Fine voxel coords the LR shape latent decodes to (the decoder's own subdivision, no features)."""
    return shape_decoder.upsample(lr_slat, upsample_times=4)


@torch.inference_mode()
def sample_texture_slat(
    flow: nn.Module,
    cond: torch.Tensor,
    shape_slat: SparseTensor,
    params: SamplerParams,
    shape_normalization: Normalization,
    tex_normalization: Normalization,
    noise: NoiseSource,
    on_step: StepCallback | None = None,
) -> SparseTensor:
    """The (denormalised) PBR latent on the shape latent's voxels; the normalised shape latent rides along as
    `concat_cond` in both guidance branches."""
    concat = shape_normalization.normalize(shape_slat)
    n_noise = flow.in_channels - concat.feats.shape[1]
    x = shape_slat.replace(noise((shape_slat.feats.shape[0], n_noise)).to(cond.device))
    with captured_graphs(flow):
        out = SAMPLER.sample(flow, x, cond, torch.zeros_like(cond), params, on_step, concat_cond=concat).samples
    return tex_normalization.denormalize(out)
