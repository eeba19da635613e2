"""Synthetic backend results with known content, in the backend's conventions (backend/asset/textured_mesh.py).

A square plane in the XZ plane at y = 0 facing -Y, with UVs u = x + 0.5, v = z + 0.5. Its base colour is red in
the top half of the texture (v > 0.5) and blue in the bottom half, with a fully transparent disk in the middle;
its metallic-roughness texture has roughness 0.5 everywhere and metallic 1 on the left half (u < 0.5).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

RED, BLUE = (220, 30, 30), (30, 30, 220)
HOLE_RADIUS = 0.2  # in UV units, around (0.5, 0.5)


def plane_arrays(n: int = 8, texture: int = 64) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(mesh, textures): an n x n vertex grid (2 (n-1)^2 triangles, counter-clockwise seen from -Y)."""
    u, v = np.meshgrid(np.linspace(0, 1, n, dtype=np.float32), np.linspace(0, 1, n, dtype=np.float32), indexing="ij")
    u, v = u.ravel(), v.ravel()
    positions = np.stack([u - 0.5, np.zeros_like(u), v - 0.5], axis=1)
    normals = np.tile(np.array([0, -1, 0], np.float32), (len(u), 1))
    grid = np.arange(n * n).reshape(n, n)  # grid[i, j]: u index i, v index j
    a, b, c, d = grid[:-1, :-1].ravel(), grid[1:, :-1].ravel(), grid[1:, 1:].ravel(), grid[:-1, 1:].ravel()
    indices = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.uint32)
    mesh = {"positions": positions, "indices": indices, "normals": normals, "uvs": np.stack([u, v], axis=1)}
    return mesh, textures(texture)


def textures(size: int) -> dict[str, np.ndarray]:
    rows = (np.arange(size) + 0.5) / size
    tv = 1.0 - rows[:, None]  # texel row r holds v = 1 - (r + 0.5) / size: top row first
    tu = rows[None, :]
    base = np.zeros((size, size, 4), np.uint8)
    base[..., :3] = np.where((tv > 0.5)[..., None], RED, BLUE)
    base[..., 3] = np.where((tu - 0.5) ** 2 + (tv - 0.5) ** 2 < HOLE_RADIUS**2, 0, 255)
    mr = np.zeros((size, size, 3), np.uint8)
    mr[..., 1] = 128
    mr[..., 2] = np.where(np.broadcast_to(tu < 0.5, (size, size)), 255, 0)
    return {"base_color": base, "metallic_roughness": mr}


def metadata(alpha_mode: str = "BLEND", double_sided: bool = True, asked: str = "AUTO") -> dict[str, Any]:
    """A result's metadata: the alpha mode the backend chose, and (`asked`) the one the request asked for."""
    return {"alpha_mode": alpha_mode, "alpha_cutoff": 0.5, "double_sided": double_sided, "seed": 1,
            "settings": {"alpha_mode": asked}}



def png(rgba: np.ndarray) -> bytes:
    """An 8-bit RGBA PNG file of a uint8 [H, W, 4] array (top row first), without Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgba.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgba.reshape(h, w * 4)], axis=1)  # filter byte 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


def subject_png(size: int = 128) -> bytes:
    """An object on a transparent background: an orange disk (what the backend's matting expects to find)."""
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.35) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (230, 140, 40, 255)
    return png(rgba)
