"""The gated residual that closes a DiT block: x + y * gate[item], in one pass instead of a gather and two.

`gate` holds one vector per batch item [B, C]; `row_items` maps each row to its item (None: all rows are item
0). As in the reference, y * gate is rounded to the torso dtype before the add.
"""

from __future__ import annotations

import torch

from backend.native import TRITON_AVAILABLE, use_triton

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_residual_kernel(
        x_ptr, y_ptr, gate_ptr, items_ptr, out_ptr, rows, cols, x_stride, y_stride, gate_stride,
        HAS_ITEMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = r < rows
        mask = row_ok[:, None] & (c < cols)[None, :]
        r64 = r.to(tl.int64)
        if HAS_ITEMS:
            item = tl.load(items_ptr + r, mask=row_ok, other=0).to(tl.int64)
        else:
            item = tl.zeros([BLOCK_R], dtype=tl.int64)
        x = tl.load(x_ptr + r64[:, None] * x_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + r64[:, None] * y_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + item[:, None] * gate_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        gated = (y * g).to(dtype).to(tl.float32)
        tl.store(out_ptr + r64[:, None] * cols + c[None, :], (x + gated).to(dtype), mask=mask)


def gated_residual_torch(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, row_items: torch.Tensor | None
) -> torch.Tensor:
    """The reference (also the CPU path)."""
    return x + y * (gate if row_items is None else gate[row_items])


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, row_items: torch.Tensor | None = None
) -> torch.Tensor:
    """x, y [N, C]; gate [B, C] (all three in one dtype); row_items int [N] in [0, B) or None."""
    if (
        x.dim() != 2
        or y.shape != x.shape
        or gate.dim() != 2
        or not (x.dtype == y.dtype == gate.dtype)
        or any(t.stride(-1) != 1 for t in (x, y, gate))
        or not use_triton(x, y, gate, *([row_items] if row_items is not None else []))
    ):
        return gated_residual_torch(x, y, gate, row_items)
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_c = min(1024, triton.next_power_of_2(cols))
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _gated_residual_kernel[grid](
        x, y, gate, x if row_items is None else row_items, out, rows, cols, x.stride(0), y.stride(0),
        gate.stride(0), HAS_ITEMS=row_items is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out
