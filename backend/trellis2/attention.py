"""Softmax attention over dense batches or packed variable-length batches.

The flow transformers attend either over B equal-length sequences (the dense sparse-structure model, and
the sparse models with one item) or over several items packed row-wise into one [N, H, D] matrix. Items
never attend to each other. The scale is always 1/sqrt(D), as in the reference.

Kernel choice: an equal-length batch goes through one batched `scaled_dot_product_attention` call (on an
H100 its cuDNN backend beats flash-attn FA2 by ~1.3x, shared/reference/performance.md); unequal lengths use
`flash_attn_varlen_func` when flash-attn is installed and the inputs are CUDA fp16/bf16, else one SDPA call
per item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional: the SDPA path covers every case
    flash_attn_varlen_func = None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_seqlens: list[int] | None = None,
    kv_seqlens: list[int] | None = None,
) -> torch.Tensor:
    """Attention of each query sequence over its own key/value sequence.

    Dense: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, Dv] (leave the seqlens out).
    Packed: q [Nq, H, D] with `q_seqlens` (rows per item, items contiguous), k/v [Nk, H, D] with
    `kv_seqlens` (defaults to `q_seqlens`, i.e. self-attention) -> [Nq, H, Dv].
    """
    if q_seqlens is None:
        return _sdpa(q, k, v)
    kv_seqlens = q_seqlens if kv_seqlens is None else kv_seqlens
    if len(q_seqlens) != len(kv_seqlens):
        raise ValueError(f"{len(q_seqlens)} query sequences but {len(kv_seqlens)} key/value sequences")
    num_items = len(q_seqlens)
    if q.shape[0] == 0:
        return q.new_empty(0, q.shape[1], v.shape[-1])
    if len(set(q_seqlens)) == 1 and len(set(kv_seqlens)) == 1:
        out = _sdpa(
            q.reshape(num_items, -1, *q.shape[1:]),
            k.reshape(num_items, -1, *k.shape[1:]),
            v.reshape(num_items, -1, *v.shape[1:]),
        )
        return out.reshape(q.shape[0], *out.shape[2:])
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_varlen_func(
            q, k, v, _cumulative(q_seqlens, q.device), _cumulative(kv_seqlens, q.device),
            max(q_seqlens), max(kv_seqlens),
        )
    outs, q_start, kv_start = [], 0, 0
    for q_len, kv_len in zip(q_seqlens, kv_seqlens):
        if q_len:
            qs, ks = slice(q_start, q_start + q_len), slice(kv_start, kv_start + kv_len)
            outs.append(_sdpa(q[None, qs], k[None, ks], v[None, ks])[0])
        q_start, kv_start = q_start + q_len, kv_start + kv_len
    return torch.cat(outs)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] in and out; SDPA wants heads before the sequence."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _cumulative(seqlens: list[int], device: torch.device) -> torch.Tensor:
    """int32 [B+1] offsets, as flash-attn expects."""
    offsets = [0]
    for n in seqlens:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)
