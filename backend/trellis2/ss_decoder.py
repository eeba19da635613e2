"""Sparse-structure decoder (TRELLIS v1 `SparseStructureDecoder`, spec §2.4): dense 3D convs, 16^3x8 latent -> 64^3 logits.

input_layer (fp32) -> middle_block -> blocks (ResBlock3d, with a conv + pixel-shuffle upsample between levels)
-> fp32 out_layer [ChannelLayerNorm32, SiLU, Conv3d]. With use_fp16 the convs of middle_block and blocks are
stored in fp16 and the torso runs in fp16 (fp32 on CPU, see `compute_dtype`); norms always compute in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from backend.native import compute_dtype


class Conv3d(nn.Conv3d):
    """3x3x3 conv, padding 1, whose parameters follow the activations' dtype (fp16 storage, fp32 CPU compute)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel dim of [B, C, ...], computed in fp32 (eps 1e-5, affine), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float().movedim(1, -1)
        h = F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)
        return h.movedim(-1, 1).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in fp32 (the reference's norm_type="group")."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(channels)
    raise ValueError(f"norm_type must be 'layer' or 'group', got {norm_type!r}")


class ResBlock3d(nn.Module):
    def __init__(self, channels: int, norm_type: str) -> None:
        super().__init__()
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, channels)
        self.conv1 = Conv3d(channels, channels)
        self.conv2 = Conv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


def pixel_shuffle_3d(x: torch.Tensor) -> torch.Tensor:
    """[B, C*8, D, H, W] -> [B, C, 2D, 2H, 2W]; channel c*8 + 4i + 2j + k lands at offset (i, j, k) (x most significant)."""
    b, c8, d, h, w = x.shape
    x = x.reshape(b, c8 // 8, 2, 2, 2, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c8 // 8, 2 * d, 2 * h, 2 * w)


class UpsampleBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x))


class SparseStructureDecoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: list[int],
        num_res_blocks_middle: int = 2,
        norm_type: Literal["layer", "group"] = "layer",
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0], norm_type) for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(
            norm_layer(norm_type, channels[-1]), nn.SiLU(), nn.Conv3d(channels[-1], out_channels, 3, padding=1)
        )
        for module in [*self.middle_block.modules(), *self.blocks.modules()]:
            if isinstance(module, Conv3d):
                module.to(self.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent, r, r, r] -> logits [B, out, r*2^L, ...] in z's dtype (L = len(channels) - 1)."""
        h = self.input_layer(z).to(compute_dtype(self.dtype, z.device))
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(z.dtype))


def occupied_coords(logits: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """int32 [N, 4] (batch, x, y, z) of the voxels with logit > 0, in argwhere (lexicographic) order.

    With `resolution` below the logits' grid (the pipeline's 64 -> 32 case), a coarse voxel is occupied
    when any of the fine voxels it covers is: max_pool3d over the (grid/resolution)^3 block > 0.5.
    """
    occupied = (logits > 0).float()
    grid = logits.shape[-1]
    if resolution is not None and resolution != grid:
        if grid % resolution:
            raise ValueError(f"resolution {resolution} does not divide the logits grid {grid}")
        occupied = F.max_pool3d(occupied, grid // resolution, grid // resolution, 0)
    return torch.argwhere(occupied > 0.5)[:, [0, 2, 3, 4]].int()
