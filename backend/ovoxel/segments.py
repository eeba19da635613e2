"""Ragged-segment primitives as whole-tensor torch ops, shared by the voxeliser and the asset steps.

A "segment" is a run of consecutive items owned by one parent (a triangle's candidate cells, a query's candidate
triangles). These two ops are what turn per-parent Python loops into single tensor expressions.
"""

from __future__ import annotations

import torch

INT64_MAX = torch.iinfo(torch.int64).max

def expand_segments(count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, position inside it) for every element of consecutive segments of the given lengths.

    The vectorised form of `for s in segments: for i in range(count[s])`, used wherever each item (a triangle,
    a query) fans out into a variable number of candidates.
    """
    segment = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    return segment, torch.arange(segment.numel(), device=count.device) - (torch.cumsum(count, 0) - count)[segment]

def segment_argmin(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Index [num_segments] of the smallest non-negative float32 value of each segment (-1 where empty).

    Non-negative float32 bit patterns sort like the floats, so (bits << 32 | index) packs value and position
    into one int64 that a single scatter-min can reduce; ties go to the lower index.
    """
    bits = values.float().clamp_min(0).contiguous().view(torch.int32).long()
    index = torch.arange(values.numel(), device=values.device)
    key = (bits << 32) | index
    best = torch.full((num_segments,), INT64_MAX, dtype=torch.int64, device=values.device)
    best.scatter_reduce_(0, segment.long(), key, "amin")
    return torch.where(best == INT64_MAX, torch.full_like(best, -1), best & 0xFFFFFFFF)

