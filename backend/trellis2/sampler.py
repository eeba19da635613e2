"""Flow-matching Euler sampler with classifier-free guidance, a guidance interval and guidance rescale.

The reference's `FlowEulerGuidanceIntervalSampler` (spec §4, numerics §4 "Sampler"), one class for the dense
sparse-structure latent (a [B, C, D, H, W] tensor) and the sparse structured latents (a `SparseTensor`).
The two differ in one easy-to-miss place, kept here on purpose: guidance rescale measures the spread of x0 with
the *unbiased* std for dense tensors but the *population* std for sparse ones, exactly as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from backend.trellis2.schedule import flow_time_pairs
from backend.trellis2.sparse import SparseTensor

Latent = torch.Tensor | SparseTensor
# Called after every Euler step with (steps done, total steps); raising from it stops the sampler there.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplerParams:
    """Per-stage sampling settings; the defaults are pipeline.json's sparse-structure stage."""

    steps: int = 12
    guidance_strength: float = 7.5
    guidance_rescale: float = 0.7
    guidance_interval: tuple[float, float] = (0.6, 1.0)
    rescale_t: float = 5.0

    @classmethod
    def from_params(cls, raw: Mapping[str, Any]) -> SamplerParams:
        """From a reference-style params map (pipeline.json's sampler `params`, a golden case's); keys it lacks keep
        these defaults. Settings from users are validated by the settings schema before they get here."""
        values = {**{f.name: getattr(cls, f.name) for f in fields(cls)}, **raw}
        lo, hi = values.pop("guidance_interval")
        return cls(**{**values, "guidance_interval": (float(lo), float(hi))})


@dataclass
class SampleOutput:
    samples: Latent
    # Filled only with record=True: x after each step and the x0 prediction made at each step.
    x_prev: list[Latent] = field(default_factory=list)
    pred_x0: list[Latent] = field(default_factory=list)
    cfg_applied: list[bool] = field(default_factory=list)


def _values(x: Latent) -> torch.Tensor:
    return x.feats if isinstance(x, SparseTensor) else x


def _like(x: Latent, values: torch.Tensor) -> Latent:
    return x.replace(values) if isinstance(x, SparseTensor) else values


def _batch_size(x: Latent) -> int:
    return x.batch_size if isinstance(x, SparseTensor) else x.shape[0]


def _doubled(x: Latent) -> Latent:
    """x twice along the batch: items 0..B-1 then the same items again as B..2B-1."""
    if not isinstance(x, SparseTensor):
        return torch.cat([x, x])
    # The doubled voxel set is the same at every step: keep it (and its own cache) in x's coordinate cache.
    if "cfg_doubled" not in x.cache:
        second = x.coords.clone()
        second[:, 0] += x.batch_size
        x.cache["cfg_doubled"] = (torch.cat([x.coords, second]), {})
    coords, cache = x.cache["cfg_doubled"]
    return SparseTensor(torch.cat([x.feats, x.feats]), coords, cache)


def _per_item_std(x: Latent) -> torch.Tensor:
    """Std of each batch item, broadcastable against x's values (dense: unbiased; sparse: population)."""
    if isinstance(x, SparseTensor):
        ids = x.batch_ids
        n = torch.tensor(x.seqlens, device=x.device, dtype=x.feats.dtype) * x.feats.shape[1]
        total = torch.zeros(x.batch_size, device=x.device, dtype=x.feats.dtype)
        mean = total.index_add(0, ids, x.feats.sum(dim=1)) / n
        mean_sq = total.index_add(0, ids, (x.feats**2).sum(dim=1)) / n
        return (mean_sq - mean**2).sqrt()[ids].unsqueeze(1)
    dims = list(range(1, x.dim()))
    return x.std(dim=dims, keepdim=True)


class FlowEulerGuidanceSampler:
    def __init__(self, sigma_min: float = 1e-5) -> None:
        self.sigma_min = sigma_min

    def _x0_from_v(self, x_t: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
        return (1 - self.sigma_min) * x_t - (self.sigma_min + (1 - self.sigma_min) * t) * v

    def _v_from_x0(self, x_t: torch.Tensor, t: float, x0: torch.Tensor) -> torch.Tensor:
        return ((1 - self.sigma_min) * x_t - x0) / (self.sigma_min + (1 - self.sigma_min) * t)

    def _velocity(
        self,
        model: Callable[..., Latent],
        x: Latent,
        t: float,
        cond: torch.Tensor,
        neg_cond: torch.Tensor,
        params: SamplerParams,
        model_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, bool]:
        """The guided velocity at (x, t) and whether classifier-free guidance was applied."""
        t_model = torch.full((_batch_size(x),), 1000.0 * t, dtype=torch.float32, device=_values(x).device)
        lo, hi = params.guidance_interval
        strength = params.guidance_strength if lo <= t <= hi else 1.0
        if strength == 1.0:
            return _values(model(x, t_model, cond, **model_kwargs)), False
        if strength == 0.0:
            return _values(model(x, t_model, neg_cond, **model_kwargs)), True
        v_pos, v_neg = self._both_branches(model, x, t_model, cond, neg_cond, model_kwargs)
        v = strength * v_pos + (1 - strength) * v_neg
        if params.guidance_rescale > 0:
            x_t = _values(x)
            x0_pos = self._x0_from_v(x_t, t, v_pos)
            x0_cfg = self._x0_from_v(x_t, t, v)
            ratio = _per_item_std(_like(x, x0_pos)) / _per_item_std(_like(x, x0_cfg))
            r = params.guidance_rescale
            x0 = r * x0_cfg * ratio + (1 - r) * x0_cfg
            v = self._v_from_x0(x_t, t, x0)
        return v, True

    @staticmethod
    def _both_branches(
        model: Callable[..., Latent],
        x: Latent,
        t_model: torch.Tensor,
        cond: torch.Tensor,
        neg_cond: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional velocities from ONE forward over a doubled batch.

        The reference makes two forwards; batching them halves the kernel launches (the dense stage is launch
        bound) while every item still sees only itself, so the math per item is unchanged.
        """
        rows = _values(x).shape[0]
        doubled = {k: _doubled(v) if isinstance(v, (torch.Tensor, SparseTensor)) else v
                   for k, v in model_kwargs.items()}
        out = model(_doubled(x), torch.cat([t_model, t_model]), torch.cat([cond, neg_cond]), **doubled)
        values = _values(out)
        return values[:rows], values[rows:]

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., Latent],
        noise: Latent,
        cond: torch.Tensor,
        neg_cond: torch.Tensor,
        params: SamplerParams,
        on_step: StepCallback | None = None,
        record: bool = False,
        **model_kwargs: Any,
    ) -> SampleOutput:
        """Integrate from t=1 (noise) to t=0; `model_kwargs` (e.g. concat_cond) go to every model call."""
        pairs = flow_time_pairs(params.steps, params.rescale_t)
        out = SampleOutput(samples=noise)
        x = noise
        for i, (t, t_prev) in enumerate(pairs):
            v, cfg = self._velocity(model, x, t, cond, neg_cond, params, model_kwargs)
            x_t = _values(x)
            if record:
                out.pred_x0.append(_like(x, self._x0_from_v(x_t, t, v)))
                out.cfg_applied.append(cfg)
            x = _like(x, x_t - (t - t_prev) * v)
            if record:
                out.x_prev.append(x)
            if on_step is not None:
                on_step(i + 1, len(pairs))
        out.samples = x
        return out
