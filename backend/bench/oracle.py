"""Make a random-weight pipeline produce a procedural object's voxel structure (see backend/bench/objects.py).

The networks still run in full, so their time counts; only their structural decisions are overwritten:
- `StructureOracle` wraps the sparse-structure decoder and returns logits that occupy the object's 64^3 O-Voxel;
- `install_subdivision_oracle` makes the shape decoder's up-blocks keep exactly the children the object's
  surface crosses, both in the cascade's upsample (latent grid 32) and in the final decode (the HR grid).
The texture decoder follows the shape decoder's subdivisions as always. The oracle's own GPU time (distance
evaluation) is measured, so the benchmark can report it and leave it out of the stage times.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from backend.bench.objects import ProceduralObject
from backend.trellis2.sc_vae import SparseResBlockC2S3d, SparseUnetVaeDecoder, row_blocks
from backend.trellis2.sparse import SparseTensor

CHILD_OFFSETS = torch.tensor([[k & 1, k >> 1 & 1, k >> 2 & 1] for k in range(8)])  # child k: bit 0 -> x


class StructureOracle(nn.Module):
    """The sparse-structure decoder, run as usual, with its logits replaced by +-1 on the object's voxels."""

    def __init__(self, decoder: nn.Module, occupied: torch.Tensor, resolution: int) -> None:
        super().__init__()
        self.decoder = decoder
        grid = torch.zeros(resolution, resolution, resolution, dtype=torch.bool)
        grid[tuple(occupied.long().t())] = True
        self.register_buffer("occupied", grid)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(z)
        if logits.shape[-3:] != self.occupied.shape:
            raise ValueError(f"decoder grid {tuple(logits.shape[-3:])} != oracle grid {tuple(self.occupied.shape)}")
        inside = torch.ones((), dtype=logits.dtype, device=logits.device)
        return torch.where(self.occupied, inside, -inside).expand_as(logits).contiguous()


@dataclass
class SubdivisionState:
    """What the oracle needs to know which grid the shape decoder works from: the cascade's LR latent (recognised
    by its token count) or the final one (the mesh grid the pipeline sets on the decoder, over 2^up-blocks).
    `seconds` is the oracle's own time so far."""

    obj: ProceduralObject
    lr_tokens: int
    lr_grid: int
    decoder: SparseUnetVaeDecoder
    seconds: float = 0.0
    grid: int = 0

    def latent_grid(self, tokens: int) -> int:
        if tokens == self.lr_tokens:
            return self.lr_grid
        return self.decoder.resolution >> self.decoder.num_up_blocks


def _keep_children(state: SubdivisionState, coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """bool [N, 8]: which children (at 2 x resolution) of voxels coords [N, 3] the object's surface crosses."""
    keep = torch.empty(coords.shape[0], 8, dtype=torch.bool, device=coords.device)
    offsets = CHILD_OFFSETS.to(coords.device)
    for start, stop in row_blocks(coords.shape[0], 8 * 64):  # bounds the [parts, children] distance matrix
        children = (coords[start:stop, None, :] * 2 + offsets).reshape(-1, 3)
        keep[start:stop] = state.obj.crosses(children, 2 * resolution).view(-1, 8)
    return keep


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


@contextlib.contextmanager
def subdivision_oracle(decoder: SparseUnetVaeDecoder, state: SubdivisionState) -> Iterator[None]:
    """While inside, each up-block of this decoder instance keeps the children the object's surface crosses."""
    ups = [stage[-1] for stage in decoder.blocks[:-1]]
    for level, up in enumerate(ups):
        if not isinstance(up, SparseResBlockC2S3d):
            raise TypeError(f"stage {level} ends in {type(up).__name__}, not an up-block")
        predicted = up.subdivision_logits

        def oracle(x: SparseTensor, guide: SparseTensor | None, level: int = level,
                   predicted=predicted) -> SparseTensor:
            logits = predicted(x, guide)  # the network's own prediction still runs
            if guide is not None:
                return logits
            _sync(x.feats)
            start = time.perf_counter()
            if level == 0:
                state.grid = state.latent_grid(x.coords.shape[0])
            keep = _keep_children(state, x.coords[:, 1:], state.grid << level)
            out = x.replace(torch.where(keep, 1.0, -1.0).to(logits.feats.dtype))
            _sync(x.feats)
            state.seconds += time.perf_counter() - start
            return out

        up.subdivision_logits = oracle  # an instance attribute shadows the method
    try:
        yield
    finally:
        for up in ups:
            del up.subdivision_logits
