"""Low-level ops: each module holds one op's plain-torch reference and, beside it, its Triton kernel for CUDA.

Shared here: `use_triton`, the one rule for when a kernel replaces its reference (CUDA tensors, Triton importable,
kernels not switched off); `VoxelIndex`, the coordinate hash used by the sparse convolution's neighbour map and
by mesh extraction; `compute_dtype`, the one rule for where a half-precision model torso really computes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

# "auto": Triton kernels on CUDA tensors and CUDA-graph replay of the flows; "eager": the kernels without graphs;
# "torch": the plain-torch references everywhere, no graphs (for A/B comparisons, and the escape hatch should a
# kernel misbehave on some GPU). Read from TRELLIS2_KERNELS at import; `kernel_mode` changes it for a while.
KERNEL_MODES = ("auto", "eager", "torch")
_kernel_mode = os.environ.get("TRELLIS2_KERNELS", "auto")
if _kernel_mode not in KERNEL_MODES:
    raise ValueError(f"TRELLIS2_KERNELS must be one of {KERNEL_MODES}, got {_kernel_mode!r}")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, which lets CI check them.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernels_enabled() -> bool:
    """False while every op is told to run its torch reference (TRELLIS2_KERNELS=torch or `kernel_mode`)."""
    return _kernel_mode != "torch"


def graphs_enabled() -> bool:
    """Whether the flows may capture and replay CUDA graphs (mode "auto" only)."""
    return _kernel_mode == "auto"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op should run its Triton kernel on these inputs rather than its torch reference."""
    if not kernels_enabled() or not TRITON_AVAILABLE:
        return False
    wanted = "cpu" if TRITON_INTERPRETED else "cuda"
    return all(
        t.device.type == wanted and (t.dtype in TRITON_DTYPES or not t.is_floating_point()) for t in tensors
    )


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Temporarily run every op in `mode` (one of KERNEL_MODES); the benchmark uses it to time each path."""
    global _kernel_mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    previous, _kernel_mode = _kernel_mode, mode
    try:
        yield
    finally:
        _kernel_mode = previous


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which a torso stored as `dtype` computes on `device`.

    The reference runs its fp16 decoder torsos on the GPU in fp16, and so do we. On the CPU, torch's fp16
    convolutions and matmuls run about 20x slower than fp32 ones, and fp32 is also the precision the golden
    cases were recorded in, so an fp16 torso computes in fp32 there (its parameters stay stored in fp16).
    bf16 is left alone: CPU bf16 is fast enough and the bf16 golden cases were recorded with it.
    """
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


class VoxelIndex:
    """Maps integer voxel coordinates [N, D] to their row, by sorted int64 keys and binary search.

    Works unchanged on CPU and GPU and needs no Python loop over voxels. Coordinates must be unique; a query
    outside the bounding box of the indexed voxels, or not among them, maps to -1.
    """

    def __init__(self, coords: torch.Tensor) -> None:
        coords = coords.long()
        if coords.shape[0] == 0:  # an empty box: every lookup misses
            self.low = torch.zeros(coords.shape[1], dtype=torch.long, device=coords.device)
            self.high = self.low - 1
        else:
            self.low = coords.min(dim=0).values
            self.high = coords.max(dim=0).values
        extent = (self.high - self.low + 1).clamp_min(1)
        if float(torch.prod(extent.double())) >= 2.0**62:
            raise ValueError(f"voxel bounding box {extent.tolist()} is too large for 64-bit keys")
        # Mixed-radix place values: the last coordinate varies fastest.
        strides = torch.ones_like(extent)
        for d in range(extent.numel() - 2, -1, -1):
            strides[d] = strides[d + 1] * extent[d + 1]
        self.strides = strides
        self.sorted_keys, self.rows = torch.sort(self._keys(coords))

    def _keys(self, coords: torch.Tensor) -> torch.Tensor:
        return ((coords - self.low) * self.strides).sum(dim=1)

    def lookup(self, queries: torch.Tensor) -> torch.Tensor:
        """int64 [M]: the row of each query coordinate [M, D], or -1 where no voxel is there."""
        queries = queries.long()
        if self.sorted_keys.numel() == 0:
            return torch.full((queries.shape[0],), -1, dtype=torch.long, device=queries.device)
        inside = ((queries >= self.low) & (queries <= self.high)).all(dim=1)
        keys = self._keys(queries)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_max(self.sorted_keys.numel() - 1)
        found = inside & (self.sorted_keys[pos] == keys)
        return torch.where(found, self.rows[pos], torch.full_like(pos, -1))
