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

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from protocol.settings import SETTINGS

AlphaMode = Literal["AUTO", "OPAQUE", "MASK", "BLEND"]


@dataclass(frozen=True)
class AssetSettings:
    """How an O-Voxel becomes a textured mesh: the typed form of the asset settings. Their defaults and ranges are
    the settings schema's (protocol/settings.py), which validates every value that comes from a user."""

    faces: int = SETTINGS["faces"].default  # target triangle count after simplification
    texture_size: int = SETTINGS["texture_size"].default
    remesh: bool = SETTINGS["remesh"].default
    remesh_band: float = SETTINGS["remesh_band"].default
    alpha_mode: AlphaMode = SETTINGS["alpha_mode"].default  # AUTO: BLEND when any texel is transparent, else OPAQUE
    alpha_cutoff: float = SETTINGS["alpha_cutoff"].default  # for MASK
    fill_hole_perimeter: float = SETTINGS["fill_hole_perimeter"].default  # holes with a shorter boundary close
    sharp_angle: float = SETTINGS["sharp_angle"].default  # degrees: edges turning more are shaded sharp

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> AssetSettings:
        """From resolved flat settings: those of a request that has them (a texture request has only the texture
        and alpha ones; the rest keep their defaults), anything else ignored."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


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
