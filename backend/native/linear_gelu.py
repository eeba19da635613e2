"""The DiT MLP's first layer and its tanh-GELU with the activation in the GEMM epilogue.

Unfused, the [N, 4C] hidden tensor is written by the GEMM, read and written again by the GELU and read by the
next layer. On CUDA, `torch._addmm_activation(use_gelu=True)` runs cuBLASLt's GELU epilogue (the tanh
approximation, the reference's `nn.GELU(approximate="tanh")`) on the float32 accumulator, which saves one write
and one read of the hidden tensor; a library GEMM is used rather than a hand-written Triton one, which would
have to match cuBLAS first. The CPU path is the reference's two ops (torch's CPU `_addmm_activation` uses the
erf GELU, so it is not used there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.native import kernels_enabled

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_gelu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference: Linear then tanh-GELU."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) for x [N, Cin], weight [Cout, Cin], bias [Cout] of one dtype."""
    if (
        kernels_enabled()
        and x.is_cuda
        and x.dim() == 2
        and x.dtype in FUSED_DTYPES
        and weight.dtype == bias.dtype == x.dtype
    ):
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return linear_gelu_torch(x, weight, bias)
