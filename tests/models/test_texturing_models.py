"""Texturing models: the reference's golden cases for the voxeliser, spatial-to-channel, the shape encoder and the
pipeline glue."""

from __future__ import annotations

import pytest

GOLDEN_CASES = ["mesh_to_dual_grid_a"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_case(name: str, golden_failures) -> None:
    checks, failed = golden_failures(name)
    assert checks and not failed, failed
