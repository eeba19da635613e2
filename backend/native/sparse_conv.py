"""Sub-manifold 3x3x3 sparse convolution with FlexGEMM semantics (spec §3.3-3.4, numerics §1).

out[p] = bias + sum_v W[:, v, :] @ in[p + offset_v], v = a*9 + b*3 + c with offset (a-1, b-1, c-1) on (x, y, z):
a cross-correlation over the neighbours that exist in the same batch item; missing ones contribute zero, and
the output voxels are the input voxels. The weight is stored as [Co, 3, 3, 3, Ci], exactly as the checkpoint.

Two steps, so that the neighbour map can be built once per voxel set and reused by every conv on it:
`build_neighbour_map(coords)` then `submanifold_conv3d(feats, neighbours, weight, bias)`.
"""

from __future__ import annotations

import itertools

import torch

from backend.native import VoxelIndex

# (a-1, b-1, c-1) for v = a*9 + b*3 + c: x slowest, z fastest.
KERNEL_OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.long)

# Upper bound on the elements of one im2col block [rows, 27 * Ci]; 2^26 is 128 MiB in fp16, 256 MiB in fp32.
IM2COL_BLOCK_ELEMENTS = 1 << 26


def build_neighbour_map(coords: torch.Tensor) -> torch.Tensor:
    """int32 [N, 27]: row of the neighbour of voxel i at tap v, or -1 when there is none.

    `coords` is [N, 4] = (batch, x, y, z) with unique rows; the batch column is part of the key, so
    neighbours never cross batch items.
    """
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    index = VoxelIndex(coords)
    coords = coords.long()
    offsets = torch.zeros(27, 4, dtype=torch.long, device=coords.device)
    offsets[:, 1:] = KERNEL_OFFSETS.to(coords.device)
    neighbours = torch.empty(coords.shape[0], 27, dtype=torch.int32, device=coords.device)
    for v in range(27):  # one tap at a time bounds the int64 query memory to [N, 4]
        neighbours[:, v] = index.lookup(coords + offsets[v]).int()
    return neighbours


def submanifold_conv3d(
    feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, Co] = the conv of `feats` [N, Ci] over `neighbours` [N, 27] with `weight` [Co, 3, 3, 3, Ci].

    `feats`, `weight` and `bias` must share one dtype; the result has it too.
    """
    co, *kernel, ci = weight.shape
    if kernel != [3, 3, 3]:
        raise ValueError(f"weight must be [Co, 3, 3, 3, Ci], got {tuple(weight.shape)}")
    if feats.dim() != 2 or feats.shape[1] != ci:
        raise ValueError(f"feats {tuple(feats.shape)} does not match weight input channels {ci}")
    if neighbours.shape != (feats.shape[0], 27):
        raise ValueError(f"neighbours must be [{feats.shape[0]}, 27], got {tuple(neighbours.shape)}")
    if feats.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"feats {feats.dtype}, weight {weight.dtype} and bias must share a dtype")
    return _implementation(feats.device)(feats, neighbours, weight, bias)


def _implementation(device: torch.device):
    """The seam for device-specific kernels (e.g. a Triton implicit GEMM on CUDA).

    Today the gather + GEMM below serves every device.
    """
    return submanifold_conv3d_torch


def submanifold_conv3d_torch(
    feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Explicit GEMM: gather the 27 neighbour rows of a block of voxels (im2col) and multiply once.

    Missing neighbours read an appended zero row. Blocks of rows keep the im2col buffer below
    IM2COL_BLOCK_ELEMENTS, so ~1M voxels x 1024 channels never materialise N x 27 x Ci at once.
    """
    n, ci = feats.shape
    co = weight.shape[0]
    w = weight.reshape(co, 27 * ci).t()  # row v*Ci + i multiplies channel i of tap v
    padded = torch.cat([feats, feats.new_zeros(1, ci)])
    gather = torch.where(neighbours < 0, n, neighbours).long()
    out = feats.new_empty(n, co)
    rows_per_block = max(1, IM2COL_BLOCK_ELEMENTS // (27 * ci))
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        cols = padded[gather[start:stop]].reshape(stop - start, 27 * ci)
        if bias is None:
            torch.mm(cols, w, out=out[start:stop])
        else:
            torch.addmm(bias, cols, w, out=out[start:stop])
    return out
