"""Sub-manifold 3x3x3 sparse convolution with FlexGEMM semantics (spec §3.3-3.4, numerics §1).

out[p] = bias + sum_v W[:, v, :] @ in[p + offset_v], v = a*9 + b*3 + c with offset (a-1, b-1, c-1) on (x, y, z):
a cross-correlation over the neighbours that exist in the same batch item; missing ones contribute zero, and
the output voxels are the input voxels. The weight is stored as [Co, 3, 3, 3, Ci], exactly as the checkpoint.

Two steps, so that the neighbour map can be built once per voxel set and reused by every conv on it:
`build_neighbour_map(coords)` then `submanifold_conv3d(feats, neighbours, weight, bias)`. Passing only some rows
of the neighbour map computes only those output rows (the decoders use this to bound their memory).

On CUDA a Triton implicit GEMM (FlexGEMM's role) gathers each tile's neighbour rows straight from `feats` into
the matrix units, tap by tap, so the [N, 27 * Ci] im2col matrix of the torch reference is never written.
"""

from __future__ import annotations

import itertools

import torch

from backend.native import TRITON_AVAILABLE, VoxelIndex, use_triton

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
    return neighbour_rows(VoxelIndex(coords), coords)


def neighbour_rows(index: VoxelIndex, queries: torch.Tensor) -> torch.Tensor:
    """int32 [M, 27]: the neighbour-map rows of the voxels `queries` [M, 4] among the voxels `index` holds.

    With the index's own voxels as queries this is the whole map; a block of them gives that block's rows, so a
    conv used once can stream over its output rows without ever holding the whole [N, 27] map.
    """
    queries = queries.long()
    offsets = torch.zeros(27, 4, dtype=torch.long, device=queries.device)
    offsets[:, 1:] = KERNEL_OFFSETS.to(queries.device)
    neighbours = torch.empty(queries.shape[0], 27, dtype=torch.int32, device=queries.device)
    for v in range(27):  # one tap at a time bounds the int64 query memory to [M, 4]
        neighbours[:, v] = index.lookup(queries + offsets[v]).int()
    return neighbours


def submanifold_conv3d(
    feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[M, Co] = the conv of `feats` [N, Ci] with `weight` [Co, 3, 3, 3, Ci] at the M voxels whose rows of the
    neighbour map (indices into `feats`) `neighbours` [M, 27] holds; the whole map gives all N outputs.

    `feats`, `weight` and `bias` must share one dtype; the result has it too.
    """
    co, *kernel, ci = weight.shape
    if kernel != [3, 3, 3]:
        raise ValueError(f"weight must be [Co, 3, 3, 3, Ci], got {tuple(weight.shape)}")
    if feats.dim() != 2 or feats.shape[1] != ci:
        raise ValueError(f"feats {tuple(feats.shape)} does not match weight input channels {ci}")
    if neighbours.dim() != 2 or neighbours.shape[1] != 27:
        raise ValueError(f"neighbours must be [M, 27], got {tuple(neighbours.shape)}")
    if feats.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"feats {feats.dtype}, weight {weight.dtype} and bias must share a dtype")
    if use_triton(feats, neighbours, weight) and neighbours.dtype == torch.int32:
        return submanifold_conv3d_triton(feats, neighbours, weight, bias)
    return submanifold_conv3d_torch(feats, neighbours, weight, bias)


def submanifold_conv3d_torch(
    feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Explicit GEMM: gather the 27 neighbour rows of a block of voxels (im2col) and multiply once.

    Missing neighbours read an appended zero row. Blocks of rows keep the im2col buffer below
    IM2COL_BLOCK_ELEMENTS, so ~1M voxels x 1024 channels never materialise N x 27 x Ci at once.
    """
    n, ci = feats.shape
    co = weight.shape[0]
    rows = neighbours.shape[0]
    w = weight.reshape(co, 27 * ci).t()  # row v*Ci + i multiplies channel i of tap v
    padded = torch.cat([feats, feats.new_zeros(1, ci)])
    gather = torch.where(neighbours < 0, n, neighbours).long()
    out = feats.new_empty(rows, co)
    rows_per_block = max(1, IM2COL_BLOCK_ELEMENTS // (27 * ci))
    for start in range(0, rows, rows_per_block):
        stop = min(rows, start + rows_per_block)
        cols = padded[gather[start:stop]].reshape(stop - start, 27 * ci)
        if bias is None:
            torch.mm(cols, w, out=out[start:stop])
        else:
            torch.addmm(bias, cols, w, out=out[start:stop])
    return out


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _submanifold_conv3d_kernel(
        feats_ptr, nbr_ptr, w_ptr, bias_ptr, out_ptr, rows, ci, co,
        K_TILES: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        m_ok = m < rows
        n_ok = n < co
        m64 = m.to(tl.int64)
        w_rows = w_ptr + n.to(tl.int64)[:, None] * (27 * ci)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(0, 27 * K_TILES):  # tap-major, then input-channel tiles
            tap = step // K_TILES
            kk = (step % K_TILES) * BLOCK_K + k
            k_ok = kk < ci
            src = tl.load(nbr_ptr + m64 * 27 + tap, mask=m_ok, other=-1)
            a = tl.load(feats_ptr + src.to(tl.int64)[:, None] * ci + kk[None, :],
                        mask=(src >= 0)[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_rows + tap * ci + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + m64[:, None] * co + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def submanifold_conv3d_triton(
    feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Masked implicit GEMM: tiles of BLOCK_M output voxels x BLOCK_N output channels, accumulated in float32
    over the 27 taps; a missing neighbour loads zeros. float32 inputs multiply in full float32 (no TF32)."""
    ci, co = feats.shape[1], weight.shape[0]
    rows = neighbours.shape[0]
    out = torch.empty(rows, co, dtype=feats.dtype, device=feats.device)
    if rows == 0:
        return out
    block_n = min(128, max(16, triton.next_power_of_2(co)))
    block_k = min(64, max(16, triton.next_power_of_2(ci)))
    block_m = 128 if block_n >= 64 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(co, block_n))
    fp32 = feats.dtype == torch.float32  # twice the shared memory per stage: one stage fewer
    _submanifold_conv3d_kernel[grid](
        feats.contiguous(), neighbours.contiguous(), weight.contiguous(), weight if bias is None else bias, out,
        rows, ci, co, K_TILES=triton.cdiv(ci, block_k), HAS_BIAS=bias is not None,
        PRECISION="ieee" if fp32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=2 if fp32 else 3,
    )
    return out
