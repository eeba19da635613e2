"""The golden-case format (`shared/reference/golden/README.md`), tolerance rules, and the kind registry.

A kind handler reads one case folder and returns named checks; the runner turns them into a verdict.
Handlers live in one module per family (flows, decoders, ...) and register themselves with `golden_kind`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# numerics.md §3: fp32 outputs reproduce to ~5e-6; bf16 torsos differ by up to 2.5e-2 between kernels.
FP32_TOL = 1e-4
BF16_ATOL = 5e-2
BF16_REL_L2 = 1e-2


@dataclass
class Case:
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: Path) -> Case:
        meta = json.loads((path / "case.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
        weights_file = path / "weights.safetensors"
        weights = load_file(str(weights_file)) if weights_file.exists() else {}
        return cls(path, meta, tensors, weights)

    def weights_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state dict of one of several models stored in one weights file under `prefix`."""
        return {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}


@dataclass
class Check:
    """One compared output. `error` is max |actual - expected| (or mismatch count for exact checks)."""

    name: str
    error: float
    passed: bool
    note: str = ""


def close(name: str, actual: torch.Tensor, expected: torch.Tensor, bf16: bool = False) -> Check:
    """Float comparison at the numerics.md tolerances (fp32: atol=rtol=1e-4; bf16: atol 5e-2 or rel-L2 1e-2)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return Check(name, float("inf"), False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    if bf16:
        rel = ((a - e).norm() / e.norm().clamp_min(1e-12)).item()
        return Check(name, err, err <= BF16_ATOL or rel <= BF16_REL_L2, f"rel_l2={rel:.2e}")
    ok = bool(torch.all((a - e).abs() <= FP32_TOL + FP32_TOL * e.abs()))
    return Check(name, err, ok)


def exact(name: str, actual: torch.Tensor, expected: torch.Tensor) -> Check:
    """Integer/boolean comparison: shape and every element equal; error = number of differing elements."""
    if tuple(actual.shape) != tuple(expected.shape):
        return Check(name, float("inf"), False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    diff = int((actual.detach().cpu().long() != expected.detach().cpu().long()).sum())
    return Check(name, float(diff), diff == 0, "exact")


KindHandler = Callable[[Case], list[Check]]
KINDS: dict[str, KindHandler] = {}


def golden_kind(*names: str) -> Callable[[KindHandler], KindHandler]:
    def register(fn: KindHandler) -> KindHandler:
        for name in names:
            KINDS[name] = fn
        return fn

    return register
