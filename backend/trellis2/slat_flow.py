"""Structured-latent flows (shape and texture): the same DiT as the sparse-structure flow, on voxel tokens.

Reference: `trellis2/models/structured_latent_flow.py` (spec §2.3). Self-attention runs over all voxels of
one batch item (variable lengths), with RoPE on the integer voxel coordinates; `input_layer`/`out_layer`
are Linear layers on the feature matrix.
"""

from __future__ import annotations

import torch

from backend.trellis2.sparse import SparseTensor
from backend.trellis2.transformer import FlowTransformer, Packing, rope_phases


class SLatFlowModel(FlowTransformer):
    """Constructor args are FlowTransformer's (the reference's). `resolution` has no effect here: RoPE uses the
    voxel coordinates, so any grid size works."""

    def forward(
        self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor, concat_cond: SparseTensor | None = None
    ) -> SparseTensor:
        """x: noisy latent on voxels; t [B] = 1000 * flow time; cond [B, L, Cc] image tokens;
        concat_cond: extra per-voxel input on the same voxels (the texture flow's shape latent),
        appended after x's channels. Returns the velocity on the same voxels."""
        feats = x.feats if concat_cond is None else torch.cat([x.feats, concat_cond.feats], dim=-1)
        out = self.forward_tokens(feats, t, cond, Packing(x.seqlens, x.device), self._phases(x))
        return x.replace(out)

    def _phases(self, x: SparseTensor) -> torch.Tensor:
        """RoPE phases of x's voxels, cached with the voxel set (every step of a sampler reuses them)."""
        key = f"rope_phases_hd{self.head_dim}_freq{self.rope_freq}"
        if key not in x.cache:
            x.cache[key] = rope_phases(x.coords[:, 1:], self.head_dim, self.rope_freq)
        return x.cache[key]


class ElasticSLatFlowModel(SLatFlowModel):
    """The class name in the reference training configs. Its extra machinery only switches gradient
    checkpointing on during memory-limited training, so at inference it is exactly SLatFlowModel."""
