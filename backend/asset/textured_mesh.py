"""The finished asset handed to Blender and to GLB export, and the settings that shape it.

Axis convention: positions and normals are in the O-Voxel's own frame, **Z-up, right-handed**, object inside
[-0.5, 0.5]³ — Blender's frame, so the add-on uses them as they are. GLB export converts to glTF's Y-up with
(x, y, z) -> (x, z, -y). UVs are in [0, 1] with v pointing up (OpenGL/Blender convention); texture rows are stored
top row first, so texel row r holds v = 1 - (r + 0.5) / T.
Vertices are split along UV seams and creases; two vertices share a position only when they are copies of one
surface point, so welding by position gives back the surface (a closed 2-manifold where the object is closed).
Textures follow glTF: `base_color` is RGBA (alpha = opacity), `metallic_roughness` is RGB with G = roughness and
B = metallic (R unused, 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

AlphaMode = Literal["AUTO", "OPAQUE", "MASK", "BLEND"]


@dataclass(frozen=True)
class AssetSettings:
    """How an O-Voxel becomes a textured mesh. Defaults are the reference web app's."""

    faces: int = 500_000  # target triangle count after simplification
    texture_size: int = 2048
    remesh: bool = False
    remesh_band: float = 1.0
    alpha_mode: AlphaMode = "AUTO"  # AUTO: BLEND when any texel is transparent, else OPAQUE
    alpha_cutoff: float = 0.5  # for MASK
    fill_hole_perimeter: float = 3e-2  # holes with a shorter boundary are closed (world units; 16 voxels at least)
    sharp_angle: float = 40.0  # degrees: edges whose faces turn by more are shaded sharp, the rest smooth

    def __post_init__(self) -> None:
        if not 1_000 <= self.faces <= 20_000_000:
            raise ValueError(f"faces must be in [1000, 20000000], got {self.faces}")
        if self.texture_size not in (256, 512, 1024, 2048, 4096, 8192):
            raise ValueError(f"texture_size must be a power of two in 256..8192, got {self.texture_size}")
        if self.alpha_mode not in ("AUTO", "OPAQUE", "MASK", "BLEND"):
            raise ValueError(f"alpha_mode must be AUTO, OPAQUE, MASK or BLEND, got {self.alpha_mode!r}")
        if not 0.0 <= self.alpha_cutoff <= 1.0:
            raise ValueError(f"alpha_cutoff must be in [0, 1], got {self.alpha_cutoff}")
        if not 0.0 <= self.sharp_angle <= 180.0:
            raise ValueError(f"sharp_angle must be in [0, 180] degrees, got {self.sharp_angle}")


@dataclass
class TexturedMesh:
    positions: np.ndarray  # float32 [V, 3], Z-up
    indices: np.ndarray  # int32 [F, 3], counter-clockwise seen from outside
    normals: np.ndarray  # float32 [V, 3], unit length; smooth, split at creases (and UV seams)
    uvs: np.ndarray  # float32 [V, 2] in [0, 1], v up
    base_color: np.ndarray  # uint8 [T, T, 4] RGBA, top row first
    metallic_roughness: np.ndarray  # uint8 [T, T, 3] (0, roughness, metallic), top row first
    alpha_mode: Literal["OPAQUE", "MASK", "BLEND"] = "OPAQUE"
    alpha_cutoff: float = 0.5
    double_sided: bool = False
    metadata: dict = field(default_factory=dict)
