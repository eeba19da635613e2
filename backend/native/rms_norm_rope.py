"""Per-head RMS norm of queries/keys, then the rotary position embedding, in one pass (numerics §4).

    y = x / max(||x||, 1e-12) * gamma[h] * sqrt(D)        (float32, rounded to x's dtype: MultiHeadRMSNorm)
    y = rotate pairs (2i, 2i+1) of y by the phase of row n  (float32, rounded to x's dtype: apply_rope)

Either step may be left out (cross-attention normalises without RoPE). The input may be a strided view, such as
q out of the fused qkv projection [N, 3, H, D]; the output is a contiguous [N, H, D] tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.native import TRITON_AVAILABLE, use_triton

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, gamma_ptr, phases_ptr, out_ptr, rows, heads, dim, x_row_stride, x_head_stride, scale,
        HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """ROWS rows per program: whole [heads, dim] tiles loaded contiguously, gamma loaded once."""
        dtype = x_ptr.dtype.element_ty
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        tile_ok = (h < heads)[:, None] & (d < dim)[None, :]
        p = tl.arange(0, BLOCK_D // 2)  # pair index: channels 2p and 2p + 1
        if HAS_NORM:
            gamma = tl.load(gamma_ptr + h[:, None] * dim + d[None, :], mask=tile_ok, other=0.0)
        for i in range(ROWS):
            row = tl.program_id(0) * ROWS + i
            # The row test is made a vector before it meets a block: Triton 3.9's interpreter types
            # `block_of_bools & scalar_bool` as int32, which tl.load then refuses as a mask.
            row_ok = (d * 0 + row) < rows
            mask = tile_ok & row_ok[None, :]
            row64 = row.to(tl.int64)
            x = tl.load(x_ptr + row64 * x_row_stride + h[:, None] * x_head_stride + d[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            if HAS_NORM:
                denom = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
                x = (x / denom * gamma * scale).to(dtype).to(tl.float32)
            if HAS_ROPE:
                ph = phases_ptr + row64 * dim + 2 * p
                pair_ok = (p < dim // 2) & ((p * 0 + row) < rows)
                cos = tl.load(ph, mask=pair_ok, other=1.0)[None, :]
                sin = tl.load(ph + 1, mask=pair_ok, other=0.0)[None, :]
                even, odd = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_D // 2, 2]))
                x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), [BLOCK_H, BLOCK_D])
            tl.store(out_ptr + row64 * (heads * dim) + h[:, None] * dim + d[None, :], x.to(dtype), mask=mask)


def rms_norm_torch(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MultiHeadRMSNorm: x [..., H, D] normalised per head, times gamma [H, D] and sqrt(D), in float32."""
    return (F.normalize(x.float(), dim=-1) * gamma * x.shape[-1] ** 0.5).to(x.dtype)


def apply_rope_torch(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [..., H, D] by complex phases [..., D/2], in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * phases.unsqueeze(-2)).reshape(x.shape).to(x.dtype)


def rms_norm_rope_torch(x: torch.Tensor, gamma: torch.Tensor | None, phases: torch.Tensor | None) -> torch.Tensor:
    """The reference op sequence (also the CPU path)."""
    if gamma is not None:
        x = rms_norm_torch(x, gamma)
    if phases is not None:
        x = apply_rope_torch(x, phases)
    return x


def rms_norm_rope(x: torch.Tensor, gamma: torch.Tensor | None, phases: torch.Tensor | None) -> torch.Tensor:
    """x [N, H, D] (any row/head strides, channels contiguous); gamma [H, D] float32 or None; phases [N, D/2]
    complex64 or None. Returns [N, H, D] in x's dtype."""
    if gamma is None and phases is None:
        return x
    rows, heads, dim = x.shape
    if (
        dim % 2
        or x.stride(2) != 1
        or (gamma is not None and (gamma.shape != (heads, dim) or gamma.dtype != torch.float32))
        or (phases is not None and (phases.shape != (rows, dim // 2) or phases.dtype != torch.complex64))
        or not use_triton(x, *(t for t in (gamma,) if t is not None))
    ):
        return rms_norm_rope_torch(x, gamma, phases)
    out = torch.empty(rows, heads, dim, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    real_phases = torch.view_as_real(phases.contiguous()) if phases is not None else x
    rows_per_program = 4
    _rms_norm_rope_kernel[(triton.cdiv(rows, rows_per_program),)](
        x, x if gamma is None else gamma.contiguous(), real_phases, out, rows, heads, dim,
        x.stride(0), x.stride(1), dim**0.5,
        HAS_NORM=gamma is not None, HAS_ROPE=phases is not None, ROWS=rows_per_program,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=max(2, triton.next_power_of_2(dim)), num_warps=4,
    )
    return out
