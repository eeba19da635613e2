"""The O-Voxel asset: what the generation pipeline hands to asset building (and what the job store keeps).

Voxel i covers the cube [coords_i, coords_i + 1) · voxel_size + origin of a `resolution`³ grid over the unit cube
[-0.5, 0.5]³ (Z-up, as the training data). `attrs` holds the 6 PBR channels per voxel in `PBR_LAYOUT` order,
unclamped (clamping happens only when textures become 8-bit). The mesh is the decoder's raw dual-grid surface,
one vertex per voxel (vertex i is voxel i's dual vertex, whether a face uses it or not), which is how the asset
step reads each surface point's own attributes.
It may also carry its flexible dual grid, row-aligned with `coords` (spec §7.1): `dual_vertices` (voxel units
from the voxel's min corner), `intersected` (edge flags) and `split_weight`. The generation pipeline and the
encoder (`backend.ovoxel.encode`) both fill them; older files without them still load.
Saved as a plain `.npz`, so re-baking with other asset settings needs no regeneration.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PBR_LAYOUT = {"base_color": (0, 3), "metallic": (3, 4), "roughness": (4, 5), "alpha": (5, 6)}
DUAL_GRID_FIELDS = (("dual_vertices", np.float32, 3), ("intersected", np.bool_, 3), ("split_weight", np.float32, 1))
FORMAT_VERSION = 1


@dataclass
class OVoxel:
    coords: np.ndarray  # int32 [N, 3]
    attrs: np.ndarray  # float32 [N, 6]
    resolution: int
    vertices: np.ndarray  # float32 [V, 3], world units inside [-0.5, 0.5]^3
    faces: np.ndarray  # int32 [F, 3]
    metadata: dict[str, Any] = field(default_factory=dict)
    dual_vertices: np.ndarray | None = None  # float32 [N, 3]
    intersected: np.ndarray | None = None  # bool [N, 3]
    split_weight: np.ndarray | None = None  # float32 [N, 1], > 0

    @property
    def voxel_size(self) -> float:
        return 1.0 / self.resolution

    @property
    def origin(self) -> np.ndarray:
        return np.full(3, -0.5, dtype=np.float32)

    def __post_init__(self) -> None:
        self.coords = np.ascontiguousarray(self.coords, dtype=np.int32)
        self.attrs = np.ascontiguousarray(self.attrs, dtype=np.float32)
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int32)
        if self.coords.ndim != 2 or self.coords.shape[1] != 3:
            raise ValueError(f"O-Voxel coords must be [N, 3], got {self.coords.shape}")
        if self.attrs.shape != (self.coords.shape[0], 6):
            raise ValueError(f"O-Voxel attrs must be [{self.coords.shape[0]}, 6], got {self.attrs.shape}")
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3 or self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError("O-Voxel mesh must be vertices [V, 3] and faces [F, 3]")
        if self.resolution <= 0:
            raise ValueError(f"O-Voxel resolution must be positive, got {self.resolution}")
        n = self.coords.shape[0]
        for name, dtype, width in DUAL_GRID_FIELDS:
            value = getattr(self, name)
            if value is not None:
                value = np.ascontiguousarray(value, dtype=dtype)
                if value.shape != (n, width):
                    raise ValueError(f"O-Voxel {name} must be [{n}, {width}], got {value.shape}")
                setattr(self, name, value)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        optional = {name: getattr(self, name) for name, _, _ in DUAL_GRID_FIELDS if getattr(self, name) is not None}
        np.savez_compressed(
            buf,
            **optional,
            coords=self.coords,
            attrs=self.attrs,
            vertices=self.vertices,
            faces=self.faces,
            header=np.frombuffer(
                json.dumps(
                    {"format_version": FORMAT_VERSION, "resolution": self.resolution, "metadata": self.metadata}
                ).encode(),
                dtype=np.uint8,
            ),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> OVoxel:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode())
                if header.get("format_version") != FORMAT_VERSION:
                    raise ValueError(
                        f"O-Voxel file format {header.get('format_version')} is not {FORMAT_VERSION}; "
                        "regenerate it with this version"
                    )
                optional = {name: z[name] for name, _, _ in DUAL_GRID_FIELDS if name in z.files}
                return cls(z["coords"], z["attrs"], int(header["resolution"]), z["vertices"], z["faces"],
                           header.get("metadata", {}), **optional)
        except (KeyError, OSError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a valid O-Voxel .npz: {exc}") from exc

    def save(self, path: Path) -> None:
        """Atomic write: a reader never sees a half-written file."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> OVoxel:
        return cls.from_bytes(Path(path).read_bytes())
