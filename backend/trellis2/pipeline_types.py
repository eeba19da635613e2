"""What each pipeline type loads and runs, its published stages, and the reference's fixed grid sizes; torch-free,
so the weights command and the CLIs read them without loading a model.

Grid sizes are the reference's table (spec §6.1, texturing.md §1.3), not the checkpoints' `resolution` fields,
whose real values nobody here has read: the structure flow's dense latent is 16³; a shape flow's latent grid is its
asset resolution / 16 (512 -> 32³, 1024 -> 64³); the 1536 cascade targets 96³; texturing voxelises at the chosen
resolution itself. At load, the flows whose `resolution` the pipeline relies on are checked against the table
(`check_grids`), so a checkpoint that disagrees is a clear error instead of a silently coarser asset. Our own tiny
test checkpoint declares `grid_scale` (0.25) in its pipeline JSON to run every path at a quarter of these sizes;
the official files have no such key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backend.progress import Stage

# The stages a generation reports, with their share of a typical job's time (measured on the GPU, 1024_cascade).
PREPROCESS = Stage("preprocess", 1.0)
CONDITION = Stage("condition", 1.0)
SPARSE_STRUCTURE = Stage("sparse_structure", 9.0)
SHAPE = Stage("shape", 20.0)  # the one shape flow of a non-cascade type
SHAPE_LR = Stage("shape_lr", 10.0)
UPSAMPLE = Stage("upsample", 1.0)
SHAPE_HR = Stage("shape_hr", 40.0)
TEXTURE = Stage("texture", 22.0)
DECODE = Stage("decode", 10.0)

LATENT_CELL = 16  # asset voxels per latent cell along each axis
STRUCTURE_GRID = 16  # the dense structure flow's latent grid
# The asset resolution each shape flow's latent makes (the reference's table).
SHAPE_FLOW_RESOLUTION = {"shape_slat_flow_model_512": 512, "shape_slat_flow_model_1024": 1024}
# The `resolution` each flow's checkpoint JSON must declare, at grid scale 1. The texture flows are not checked:
# their field is unused (the sparse model has no positional table) and the 1024 one may say 32 (spec §1.3).
DECLARED_RESOLUTION = {"sparse_structure_flow_model": STRUCTURE_GRID,
                       **{name: res // LATENT_CELL for name, res in SHAPE_FLOW_RESOLUTION.items()}}
ALWAYS_LOADED = ("sparse_structure_flow_model", "sparse_structure_decoder", "shape_slat_decoder", "tex_slat_decoder")
# What the texturing pipeline loads (texturing_pipeline.json's models), and the flow + condition size per resolution.
TEXTURING_MODELS = ("shape_slat_encoder", "tex_slat_decoder", "tex_slat_flow_model_512", "tex_slat_flow_model_1024")


@dataclass(frozen=True)
class PipelineType:
    """Which flows a pipeline type chains, and where it conditions and stops. Grids follow the reference's table
    (`Grids`); conditioning for the HR shape and texture stages is at `cond_resolution`."""

    shape_models: tuple[str, ...]  # one flow, or (LR flow, HR flow) for a cascade
    tex_model: str
    cond_resolution: int
    upscale: float = 1.0  # the cascade's target over its HR flow's resolution (1.5: 1536)

    @property
    def models(self) -> tuple[str, ...]:
        return (*self.shape_models, self.tex_model)

    @property
    def stages(self) -> tuple[Stage, ...]:
        shape = (SHAPE,) if len(self.shape_models) == 1 else (SHAPE_LR, UPSAMPLE, SHAPE_HR)
        return (PREPROCESS, CONDITION, SPARSE_STRUCTURE, *shape, TEXTURE, DECODE)


PIPELINE_TYPES = {
    "512": PipelineType(("shape_slat_flow_model_512",), "tex_slat_flow_model_512", 512),
    "1024": PipelineType(("shape_slat_flow_model_1024",), "tex_slat_flow_model_1024", 1024),
    "1024_cascade": PipelineType(("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
                                 "tex_slat_flow_model_1024", 1024),
    "1536_cascade": PipelineType(("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
                                 "tex_slat_flow_model_1024", 1024, upscale=1.5),
}


@dataclass(frozen=True)
class Grids:
    """The reference's grid sizes for one checkpoint (scaled by its `grid_scale`, 1 for the official files)."""

    scale: float = 1.0

    @classmethod
    def of(cls, args: Mapping[str, Any]) -> Grids:
        return cls(float(args.get("grid_scale", 1.0)))

    def asset_resolution(self, shape_flow: str) -> int:
        """Voxels per axis of the asset a shape flow's latent makes (512 or 1024)."""
        return round(SHAPE_FLOW_RESOLUTION[shape_flow] * self.scale)

    def latent_grid(self, shape_flow: str) -> int:
        return self.asset_resolution(shape_flow) // LATENT_CELL

    def texturing_grid(self, resolution: int) -> int:
        """Voxels per axis texturing voxelises at for a chosen resolution (512, 1024 or 1536)."""
        return round(resolution * self.scale)

    def declared(self, model: str) -> int | None:
        """The `resolution` a model's checkpoint JSON must hold, or None where it is not relied on."""
        return None if model not in DECLARED_RESOLUTION else round(DECLARED_RESOLUTION[model] * self.scale)
