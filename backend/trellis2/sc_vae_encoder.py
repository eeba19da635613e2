"""SC-VAE shape encoder (texturing.md §1.2): a mesh's flexible dual grid -> the 32-channel shape latent.

`FlexiDualGridVaeEncoder` (class of `shape_enc_next_dc_f16c32_fp16`) feeds 6 channels per dual-grid voxel,
(dual vertex in its voxel - 0.5, edge flags - 0.5), through input_layer (fp32) -> stages of SparseConvNeXtBlock3d,
each but the last ending in a SparseResBlockS2C3d that packs every 2x2x2 block of voxels into one voxel (x2
coarser, four times: res 512 -> 32^3 latent grid) -> fp32 layer norm (no affine) -> to_latent -> (mean, logvar).
Inference uses z = mean (the reference's sample_posterior=False): encoding draws no noise.
Each spatial-to-channel step records its level of the voxel hierarchy on the coarse voxels (`sc_vae.Subdivision`),
so the texture decoder re-expands the latent onto exactly these voxels, in the voxeliser's row order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backend.native import compute_dtype
from backend.trellis2.sc_vae import Linear, SparseConv3d, build_stages, spatial_to_channel
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.transformer import LayerNorm32


class SparseResBlockS2C3d(nn.Module):
    """Spatial-to-channel down-block C -> O: conv to O/8 channels on the fine voxels, pack 2x2x2 children into
    O channels of their parent (absent children zero), conv on the coarse voxels; the skip packs the input to 8C
    channels and averages groups of 8C/O consecutive ones. `use_checkpoint` (training only) is ignored."""

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        if out_channels % 8 or (8 * channels) % out_channels:
            raise ValueError(f"S2C block needs O divisible by 8 and 8C by O, got C={channels}, O={out_channels}")
        self.out_channels = out_channels
        self.norm1 = LayerNorm32(channels, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, eps=1e-6, elementwise_affine=False)
        self.conv1 = SparseConv3d(channels, out_channels // 8)
        self.conv2 = SparseConv3d(out_channels, out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = spatial_to_channel(self.conv1(x.replace(F.silu(self.norm1(x.feats)))))
        packed = spatial_to_channel(x).feats
        skip = packed.reshape(packed.shape[0], self.out_channels, -1).mean(dim=-1)
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        return h.replace(h.feats + skip)


DOWN_BLOCK_TYPES = {"SparseResBlockS2C3d": SparseResBlockS2C3d}


class SparseUnetVaeEncoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str],
        down_block_type: list[str],
        block_args: list[dict[str, Any]] | None = None,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.dtype = torch.float16 if use_fp16 else torch.float32
        # Registration order matches the reference state_dict order.
        self.input_layer = Linear(in_channels, model_channels[0])
        self.to_latent = Linear(model_channels[-1], 2 * latent_channels)
        self.blocks = build_stages(model_channels, num_blocks, block_type, down_block_type, DOWN_BLOCK_TYPES,
                                   block_args, self.dtype)

    def encode(self, x: SparseTensor) -> tuple[SparseTensor, SparseTensor]:
        """(mean, logvar) on the coarsest voxels, which carry the whole voxel hierarchy in their cache."""
        h = x.replace(self.input_layer(x.feats).to(compute_dtype(self.dtype, x.device)))
        for stage in self.blocks:
            for block in stage:
                h = block(h)
        h = h.replace(self.to_latent(F.layer_norm(h.feats.to(x.dtype), h.feats.shape[-1:])))
        mean, logvar = h.feats.chunk(2, dim=-1)
        return h.replace(mean), h.replace(logvar)


class FlexiDualGridVaeEncoder(SparseUnetVaeEncoder):
    """The shape encoder: SparseUnetVaeEncoder on the 6 dual-grid channels."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The SparseUnetVaeEncoder arguments after in_channels (model_channels, latent_channels, ...)."""
        super().__init__(6, *args, **kwargs)

    def encode_dual_grid(self, vertices: SparseTensor, intersected: SparseTensor) -> tuple[SparseTensor, SparseTensor]:
        """(mean, logvar) of a dual grid: vertices [N, 3] in voxel units from each voxel's min corner, edge flags
        [N, 3] on the same voxels."""
        if not torch.equal(vertices.coords, intersected.coords):
            raise ValueError("dual vertices and edge flags must be on the same voxels, in the same order")
        x = vertices.replace(torch.cat([vertices.feats - 0.5, intersected.feats.to(vertices.dtype) - 0.5], dim=1))
        return self.encode(x)

    def forward(self, vertices: SparseTensor, intersected: SparseTensor) -> SparseTensor:
        """The shape latent z = mean (no posterior sampling, as the texturing pipeline)."""
        return self.encode_dual_grid(vertices, intersected)[0]
