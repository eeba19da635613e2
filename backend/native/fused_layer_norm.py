"""LayerNorm in float32 with what the DiT blocks and decoders put around it, in one pass over the rows.

    x' = x + residual * gate[item]         (only with a residual; without a gate, x + residual)
    h  = LN(x') [* weight + bias] [* (1 + scale[item]) + shift[item]] [-> SiLU]

`item` is the batch item of each row (`row_items`; all rows are item 0 without it), so per-item adaLN vectors
[B, C] are read in place instead of being gathered into [N, C] copies. The statistics and the affine step are
float32 whatever the storage dtype; every intermediate the reference stores in the torso dtype (the gated
residual, the LN output, 1 + scale, the modulated product) is rounded to that dtype at the same place in the
kernel, so a bf16 block gets the reference's values up to summation order. Without a residual, x' is x itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.native import TRITON_AVAILABLE, use_triton

MAX_TRITON_COLS = 16384  # one row must fit in one program's registers

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _fused_layer_norm_kernel(
        x_ptr, res_ptr, gate_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, items_ptr, x_out_ptr, h_ptr,
        rows, cols, x_stride, res_stride, gate_stride, scale_stride, shift_stride, eps,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr,
        HAS_ITEMS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        row_ok = r < rows
        col_ok = c < cols
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * x_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ITEMS:
            item = tl.load(items_ptr + r, mask=row_ok, other=0).to(tl.int64)
        else:
            item = tl.zeros([BLOCK_R], dtype=tl.int64)
        if HAS_RES:
            y = tl.load(res_ptr + r64[:, None] * res_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                g = tl.load(gate_ptr + item[:, None] * gate_stride + c[None, :], mask=mask, other=0.0)
                y = (y * g.to(tl.float32)).to(dtype).to(tl.float32)
            x = (x + y).to(dtype).to(tl.float32)
            tl.store(x_out_ptr + r64[:, None] * cols + c[None, :], x.to(dtype), mask=mask)
        mean = tl.sum(x, axis=1) / cols
        centred = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / cols
        h = centred * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_AFFINE:
            w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
            h = h * w[None, :] + b[None, :]
        h = h.to(dtype).to(tl.float32)
        if HAS_MOD:
            s = tl.load(scale_ptr + item[:, None] * scale_stride + c[None, :], mask=mask, other=0.0)
            t = tl.load(shift_ptr + item[:, None] * shift_stride + c[None, :], mask=mask, other=0.0)
            one_plus_s = (1.0 + s.to(tl.float32)).to(dtype).to(tl.float32)
            h = (h * one_plus_s).to(dtype).to(tl.float32)
            h = (h + t.to(tl.float32)).to(dtype).to(tl.float32)
        if SILU:
            h = h * tl.sigmoid(h)
        tl.store(h_ptr + r64[:, None] * cols + c[None, :], h.to(dtype), mask=mask)


def layer_norm32(
    x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """LayerNorm over the last dim computed in float32 (float32 affine params), returned in x's dtype.

    The reference casts a half input to float32, normalises and casts back. Without affine params, PyTorch's
    kernel does exactly that internally for a half input (float32 statistics and arithmetic, one rounding at the
    end), so the input goes in as is; its CUDA kernel rejects half input with float32 params, so the affine norm
    keeps the explicit round trip.
    """
    if weight is not None and x.dtype != weight.dtype:
        return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).type(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


Tensor = torch.Tensor


def fused_layer_norm_torch(
    x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None, residual: Tensor | None = None,
    gate: Tensor | None = None, modulation: tuple[Tensor, Tensor] | None = None, row_items: Tensor | None = None,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the DiT block's and decoders' own op sequence (also the CPU path); arguments as in
    `fused_layer_norm`."""

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return values if row_items is None else values[row_items]

    if residual is not None:
        x = x + (residual if gate is None else residual * per_row(gate))
    h = layer_norm32(x, eps, weight, bias)
    if modulation is not None:
        scale, shift = modulation
        h = h * per_row(1 + scale) + per_row(shift)
    return x, (F.silu(h) if silu else h)


def fused_layer_norm(
    x: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_items: torch.Tensor | None = None,
    silu: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h) as in the module docstring. x, residual [N, C]; weight, bias [C] (float32); gate, scale, shift
    [B, C] in x's dtype; row_items int [N] in [0, B) or None (every row is item 0). With `out` (contiguous
    [N, C] in x's dtype, which may be x itself when there is no residual) h is written there."""
    if (weight is None) != (bias is None):
        raise ValueError("pass both LayerNorm affine parameters (weight and bias) or neither")
    if gate is not None and residual is None:
        raise ValueError("a gate needs a residual to scale")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    per_item = [v for v in (gate, *(modulation or ())) if v is not None]
    floats = [x, *(v for v in (weight, bias, residual) if v is not None), *per_item]
    if (
        x.dim() != 2
        or x.shape[1] > MAX_TRITON_COLS
        or any(v.dtype != x.dtype or v.dim() != 2 or v.stride(1) != 1 for v in per_item)
        or any(t.stride(-1) != 1 for t in floats)
        or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype))
        or not use_triton(*floats, *([row_items] if row_items is not None else []))
    ):
        x, h = fused_layer_norm_torch(x, eps, weight, bias, residual, gate, modulation, row_items, silu)
        return x, h if out is None else out.copy_(h)
    rows, cols = x.shape
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    x_out = torch.empty_like(h) if residual is not None else x
    if rows == 0:
        return x_out, h
    scale, shift = modulation if modulation is not None else (None, None)
    block_c = triton.next_power_of_2(cols)
    block_r = max(1, min(64, 4096 // block_c))
    dummy = x  # never read: the constexpr flags switch every unused pointer off
    _fused_layer_norm_kernel[(triton.cdiv(rows, block_r),)](
        x, dummy if residual is None else residual, dummy if gate is None else gate,
        dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if scale is None else scale, dummy if shift is None else shift,
        dummy if row_items is None else row_items, x_out, h,
        rows, cols, x.stride(0), 0 if residual is None else residual.stride(0),
        0 if gate is None else gate.stride(0), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.stride(0), eps,
        HAS_RES=residual is not None, HAS_GATE=gate is not None, HAS_AFFINE=weight is not None,
        HAS_MOD=modulation is not None, HAS_ITEMS=row_items is not None, SILU=silu,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r * block_c >= 4096 else 4,
    )
    return x_out, h
