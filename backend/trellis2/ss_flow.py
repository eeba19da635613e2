"""Sparse-structure flow: a DiT over the dense R^3 latent grid (16^3 x 8 channels for the 4B model).

Reference: `trellis2/models/sparse_structure_flow.py` (spec §2.2). Tokens are the grid cells in x-major
order; RoPE phases for them live in the persistent buffer `rope_phases`, which the checkpoint does not carry:
it is computed here (`compute_buffers`), never loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from backend.trellis2.transformer import FlowTransformer, Packing, grid_coords, rope_phases


class SparseStructureFlowModel(FlowTransformer):
    """Constructor args are the reference's (the checkpoint JSON's `args`).

    Accepted but without effect at inference: `use_checkpoint` (gradient checkpointing), `initialization`
    (training init; weights come from the checkpoint) and any other keyword, which the reference also
    swallows. `rope_freq` is accepted but, as in the reference, the dense phases always use (1, 10000).
    Only pe_mode 'rope' is implemented (the 4B model's); 'ape' raises.
    """

    COMPUTED_BUFFERS = ("rope_phases",)

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        pe_mode: str = "ape",
        rope_freq: tuple[float, float] = (1.0, 10000.0),
        dtype: str | torch.dtype = "float32",
        use_checkpoint: bool = False,
        share_mod: bool = False,
        initialization: str = "vanilla",
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        **ignored: Any,
    ):
        if pe_mode != "rope":
            raise NotImplementedError(f"pe_mode {pe_mode!r}: only 'rope' (the TRELLIS.2-4B setting) is implemented")
        super().__init__(
            in_channels, model_channels, cond_channels, out_channels, num_blocks, num_heads, num_head_channels,
            mlp_ratio, share_mod, qk_rms_norm, qk_rms_norm_cross, dtype,
        )
        self.resolution = resolution
        self.register_buffer("rope_phases", torch.empty(resolution**3, self.head_dim // 2, dtype=torch.complex64))
        self.compute_buffers()

    def compute_buffers(self) -> None:
        """(Re)fill `rope_phases`; call after `to_empty()` when the model was built on the meta device.

        Computed on the CPU, as the reference does at construction, then copied to the buffer's device.
        """
        if self.rope_phases.is_meta:
            return
        with torch.device("cpu"):
            phases = rope_phases(grid_coords(self.resolution), self.head_dim)
        with torch.no_grad():
            self.rope_phases.copy_(phases)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, R, R, R]; t [B] = 1000 * flow time; cond [B, L, Cc] -> velocity [B, Cout, R, R, R]."""
        batch, res = x.shape[0], self.resolution
        if tuple(x.shape[1:]) != (self.in_channels, res, res, res):
            raise ValueError(f"expected x [B, {self.in_channels}, {res}, {res}, {res}], got {tuple(x.shape)}")
        tokens = res**3
        h = x.reshape(batch, self.in_channels, tokens).transpose(1, 2).reshape(batch * tokens, self.in_channels)
        packing = Packing([tokens] * batch, x.device)
        phases = self.rope_phases.repeat(batch, 1)
        out = self.forward_tokens(h, t, cond, packing, phases)
        out = out.view(batch, tokens, self.out_channels).transpose(1, 2)
        return out.reshape(batch, self.out_channels, res, res, res)
