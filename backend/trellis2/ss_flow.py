"""Sparse-structure flow: a DiT over the dense R^3 latent grid (16^3 x 8 channels for the 4B model).

Reference: `trellis2/models/sparse_structure_flow.py` (spec §2.2). Tokens are the grid cells in x-major
order; RoPE phases for them live in the persistent buffer `rope_phases`, which the checkpoint does not carry:
it is computed here (`compute_buffers`), never loaded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from backend.trellis2.transformer import FlowTransformer, Packing, grid_coords, rope_phases

_FLOW_ARGS = set(inspect.signature(FlowTransformer.__init__).parameters) - {"self"}


class SparseStructureFlowModel(FlowTransformer):
    """Constructor args are FlowTransformer's (the reference's). Like the reference, this class also accepts and
    ignores unknown keywords; `rope_freq` is stored but, as in the reference, the dense phases always use the
    default (1, 10000).
    """

    COMPUTED_BUFFERS = ("rope_phases",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{k: v for k, v in kwargs.items() if k in _FLOW_ARGS})
        self.register_buffer(
            "rope_phases", torch.empty(self.resolution**3, self.head_dim // 2, dtype=torch.complex64)
        )
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
