"""Each native kernel against its torch reference on fresh random inputs, on one device.

Shared by the CUDA tests (tests/native/test_kernels.py, device "cuda") and by a run under Triton's CPU
interpreter (`TRITON_INTERPRET=1 python tests/native/kernel_checks.py`, device "cpu"), which is how CI checks
the kernels without a GPU. Every check first asserts that the fast path really is taken, and poisons the
allocator with NaN so that an output element a kernel forgets to write cannot pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from backend.native import TRITON_INTERPRETED, use_triton  # noqa: E402
from backend.native.fused_layer_norm import fused_layer_norm, fused_layer_norm_torch  # noqa: E402
from backend.native.gated_residual import gated_residual, gated_residual_torch  # noqa: E402
from backend.native.linear_gelu import linear_gelu, linear_gelu_torch  # noqa: E402
from backend.native.rms_norm_rope import rms_norm_rope, rms_norm_rope_torch  # noqa: E402
from backend.native.sparse_conv import (  # noqa: E402
    build_neighbour_map,
    submanifold_conv3d,
    submanifold_conv3d_torch,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Kernel vs reference: float32 to rounding; half types to about one unit in the last place. The
    interpreter rounds float32 -> bfloat16 by truncation (the GPU to nearest), and a modulated norm rounds four
    times in a row, so bfloat16 under the interpreter gets four units."""
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-5}
    eps = torch.finfo(dtype).eps * (4 if TRITON_INTERPRETED and dtype == torch.bfloat16 else 1)
    return {"atol": 2 * eps, "rtol": eps, "msg": lambda m: f"{dtype}: {m}"}


def poison(device: str) -> None:
    """Leave NaN-filled blocks in the caching allocator, so fresh outputs start out as NaN."""
    if device == "cuda":
        for size in (1 << 16, 1 << 20, 1 << 24):
            torch.full((size,), float("nan"), device=device)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_fused_layer_norm(device: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        sizes = ((300, 1536, 2), (77, 96, 3), (1000, 64, 1), (5, 200, 1)) if device == "cuda" else (
            (40, 1536, 2), (77, 96, 3), (200, 64, 1), (5, 200, 1))
        for rows, cols, items in sizes:
            x = torch.randn(rows, cols, generator=g).to(device, dtype)
            y = torch.randn(rows, cols, generator=g).to(device, dtype)
            mod = (torch.randn(items, 6 * cols, generator=g) * 0.5).to(device, dtype)
            scale, shift, gate = mod[:, :cols], mod[:, cols:2 * cols], mod[:, 2 * cols:3 * cols]  # strided views
            row_items = torch.randint(0, items, (rows,), generator=g).to(device) if items > 1 else None
            w = (1 + 0.1 * torch.randn(cols, generator=g)).to(device)
            b = (0.1 * torch.randn(cols, generator=g)).to(device)
            cases = [
                {"modulation": (scale, shift), "row_items": row_items},
                {"weight": w, "bias": b, "residual": y, "gate": gate, "row_items": row_items},
                {"residual": y, "modulation": (scale, shift), "row_items": row_items},
                {"weight": w, "bias": b, "silu": True},
                {"silu": True},
            ]
            for kwargs in cases:
                assert use_triton(x), "the Triton path must be taken"
                poison(device)
                got = fused_layer_norm(x, 1e-6, **kwargs)
                want = fused_layer_norm_torch(x, 1e-6, **kwargs)
                for a, e in zip(got, want):
                    assert not a.isnan().any(), f"unwritten output {dtype} {rows}x{cols} {sorted(kwargs)}"
                    torch.testing.assert_close(a.float(), e.float(), **tolerance(dtype))


def check_gated_residual(device: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        for rows, cols, items in ((513, 1536, 2), (7, 40, 1), (300 if device == "cuda" else 30, 2000, 3)):
            x, y = (torch.randn(rows, cols, generator=g).to(device, dtype) for _ in range(2))
            gate = torch.randn(items, 2 * cols, generator=g).to(device, dtype)[:, cols:]
            row_items = torch.randint(0, items, (rows,), generator=g).to(device) if items > 1 else None
            assert use_triton(x)
            poison(device)
            got = gated_residual(x, y, gate, row_items)
            assert not got.isnan().any()
            torch.testing.assert_close(got.float(), gated_residual_torch(x, y, gate, row_items).float(),
                                       **tolerance(dtype))


def check_rms_norm_rope(device: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        for rows, heads, dim in ((300 if device == "cuda" else 40, 12, 128), (33, 2, 32), (10, 3, 10)):
            qkv = torch.randn(rows, 3, heads, dim, generator=g).to(device, dtype)
            gamma = (1 + 0.1 * torch.randn(heads, dim, generator=g)).to(device)
            angles = torch.randn(rows, dim // 2, generator=g) * 10
            phases = torch.polar(torch.ones_like(angles), angles).to(device)
            for norm, rope in ((gamma, phases), (gamma, None), (None, phases)):
                q = qkv[:, 1]  # a strided view, as out of the qkv projection
                assert use_triton(q)
                poison(device)
                got = rms_norm_rope(q, norm, rope)
                assert got.is_contiguous() and not got.isnan().any()
                torch.testing.assert_close(got.float(), rms_norm_rope_torch(q, norm, rope).float(),
                                           **tolerance(dtype))


def random_voxels(g: torch.Generator, count: int, grid: int, device: str) -> torch.Tensor:
    cells = torch.randperm(grid**3, generator=g)[:count]
    xyz = torch.stack([cells // grid**2, cells // grid % grid, cells % grid], dim=1)
    batch = (torch.arange(count) >= count // 3).long()[:, None]  # two batch items
    return torch.cat([batch, xyz], dim=1).int().to(device)


def check_sparse_conv(device: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    big = device == "cuda"
    shapes = [(64, 64), (128, 512), (512, 256), (3, 5)] if big else [(16, 24), (5, 3), (40, 70)]
    coords = random_voxels(g, 20000 if big else 300, 40 if big else 9, device)
    neighbours = build_neighbour_map(coords)
    for dtype in (torch.float32, torch.float16):
        for ci, co in shapes:
            feats = torch.randn(coords.shape[0], ci, generator=g).to(device, dtype)
            weight = (torch.randn(co, 3, 3, 3, ci, generator=g) / (27 * ci) ** 0.5).to(device, dtype)
            bias = torch.randn(co, generator=g).to(device, dtype)
            for rows, b in ((slice(None), bias), (slice(17, 250), None)):  # all rows; a block without bias
                assert use_triton(feats, neighbours, weight)
                poison(device)
                got = submanifold_conv3d(feats, neighbours[rows], weight, b)
                want = submanifold_conv3d_torch(feats.double(), neighbours[rows], weight.double(),
                                                None if b is None else b.double())
                assert not got.isnan().any()
                if dtype == torch.float32:
                    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
                else:  # half inputs, float32 accumulation: rounding of the inputs and the output only
                    assert rel_l2(got, want) < 2e-3, rel_l2(got, want)


def check_linear_gelu(device: str, seed: int = 0) -> None:
    """CUDA only (cuBLASLt's epilogue). float32 is tight enough to tell the tanh GELU from the erf one (they
    differ by up to 5e-4), so it pins the approximation as well as the GEMM."""
    g = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        x = (torch.randn(999, 1536, generator=g) * 0.5).to(device, dtype)
        w = (torch.randn(8192, 1536, generator=g) / 1536**0.5).to(device, dtype)
        b = torch.randn(8192, generator=g).to(device, dtype)
        poison(device)
        got = linear_gelu(x, w, b)
        want = linear_gelu_torch(x.double(), w.double(), b.double())
        assert not got.isnan().any()
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)
        else:
            assert rel_l2(got, want) < 5e-3, (dtype, rel_l2(got, want))


INTERPRETER_CHECKS = [check_fused_layer_norm, check_gated_residual, check_rms_norm_rope, check_sparse_conv]
CUDA_CHECKS = [*INTERPRETER_CHECKS, check_linear_gelu]

if __name__ == "__main__":
    if not TRITON_INTERPRETED:
        raise SystemExit("run with TRITON_INTERPRET=1 (Triton's CPU interpreter), or use the CUDA tests")
    for check in INTERPRETER_CHECKS:
        check("cpu")
        print(f"ok {check.__name__}", flush=True)
