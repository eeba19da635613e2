"""Sparse voxel tensor: packed features on integer voxel coordinates, several batch items at once.

Layout follows the reference (`trellis2/modules/sparse/basic.py`): ``coords`` is int32 ``[N, 4]`` =
(batch, x, y, z) with each batch item's rows contiguous and batch ids ascending; ``feats`` is ``[N, C]``.
Row order is meaningful (it fixes which noise value lands on which voxel), so nothing here reorders rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SparseTensor:
    feats: torch.Tensor
    coords: torch.Tensor
    # Per-voxel-set cache (neighbour maps, RoPE phases, batch layout). Shared by tensors made with
    # `replace`, because they have the same coordinates; never shared across different coordinates.
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(self.coords.shape)}")
        if self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"feats has {self.feats.shape[0]} rows but coords has {self.coords.shape[0]}")

    # ----------------------------------------------------------------- construction helpers
    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same voxels, new features; keeps the coordinate cache."""
        return SparseTensor(feats, self.coords, self.cache)

    # ----------------------------------------------------------------- batch layout
    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_ids(self) -> torch.Tensor:
        """int64 [N]: batch item of every row."""
        return self.coords[:, 0].long()

    @property
    def seqlens(self) -> list[int]:
        """Rows per batch item (batch size = max batch id + 1; an empty item has length 0)."""
        if "seqlens" not in self.cache:
            if self.coords.shape[0] == 0:
                self.cache["seqlens"] = []
            else:
                self.cache["seqlens"] = torch.bincount(self.batch_ids).tolist()
        return self.cache["seqlens"]

    @property
    def batch_size(self) -> int:
        return len(self.seqlens)

    def batch_slices(self) -> list[slice]:
        """Row range of each batch item."""
        out, start = [], 0
        for n in self.seqlens:
            out.append(slice(start, start + n))
            start += n
        return out
