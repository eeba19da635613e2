"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def image() -> Image.Image:
    """An RGBA photo-like input: an opaque orange subject on a transparent background."""
    rgba = np.zeros((120, 160, 4), np.uint8)
    rgba[20:100, 40:120] = (200, 120, 40, 255)
    return Image.fromarray(rgba, "RGBA")
