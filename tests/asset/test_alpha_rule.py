"""AUTO alpha: opaque objects with slight alpha noise stay opaque, cut-outs (leaves) become MASK, partly
transparent surfaces (glass) BLEND; an explicit setting is kept."""

from __future__ import annotations

import pytest
import torch

from backend.asset.postprocess import resolve_alpha_mode
from backend.asset.textured_mesh import AssetSettings


def texture(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGBA texture whose covered texels carry `alpha` (uint8 [H, W]), and its coverage (all but a border)."""
    rgba = torch.full((*alpha.shape, 4), 128, dtype=torch.uint8)
    rgba[..., 3] = alpha
    covered = torch.zeros(alpha.shape, dtype=torch.bool)
    covered[2:-2, 2:-2] = True
    rgba[~covered] = 0  # uncovered texels are never looked at
    return rgba, covered


def noisy_opaque(gen: torch.Generator) -> torch.Tensor:
    return (255 - torch.randint(0, 24, (128, 128), generator=gen)).to(torch.uint8)  # 231..255: regression noise


@pytest.mark.parametrize("make, expected", [
    (lambda g: noisy_opaque(g), "OPAQUE"),
    (lambda g: torch.where(torch.rand(128, 128, generator=g) < 0.003, 0, noisy_opaque(g)).to(torch.uint8), "OPAQUE"),
    (lambda g: torch.where(torch.arange(128).repeat(128, 1) < 40, 0, 255).to(torch.uint8), "MASK"),  # leaves
    (lambda g: torch.where(torch.arange(128).repeat(128, 1) < 40, 90, 255).to(torch.uint8), "BLEND"),  # glass
])
def test_auto_picks_from_how_much_of_the_surface_is_clearly_transparent(make, expected) -> None:
    gen = torch.Generator().manual_seed(0)
    base, covered = texture(make(gen))
    assert resolve_alpha_mode(AssetSettings(alpha_mode="AUTO"), base, covered) == expected


def test_a_cut_out_with_soft_edges_is_still_a_mask() -> None:
    alpha = torch.where(torch.arange(128).repeat(128, 1) < 40, 0, 255).to(torch.uint8)
    alpha[:, 40:43] = torch.tensor([60, 128, 200], dtype=torch.uint8)  # an anti-aliased border, 3 texels wide
    base, covered = texture(alpha)
    assert resolve_alpha_mode(AssetSettings(alpha_mode="AUTO"), base, covered) == "MASK"


@pytest.mark.parametrize("mode", ["OPAQUE", "MASK", "BLEND"])
def test_an_explicit_mode_is_kept(mode) -> None:
    base, covered = texture(torch.full((64, 64), 10, dtype=torch.uint8))
    assert resolve_alpha_mode(AssetSettings(alpha_mode=mode), base, covered) == mode
