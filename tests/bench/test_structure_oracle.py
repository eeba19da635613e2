"""The benchmark's structure oracle: random networks made to produce a procedural object's voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.bench.objects import OBJECTS, Part
from backend.bench.oracle import StructureOracle, SubdivisionState, subdivision_oracle
from backend.bench.run import disc_image
from backend.trellis2.pipeline import Trellis2Pipeline
from backend.trellis2.transformer import grid_coords


def test_part_distances_match_their_meshes() -> None:
    """Each primitive's distance function vanishes on its own mesh's vertices and not far from it."""
    for part in (Part("sphere", (0.3,), (0.1, 0.0, 0.0)), Part("box", (0.2, 0.1, 0.3), (0.0, 0.1, 0.0), (20, 30, 40)),
                 Part("capsule", (0.2, 0.05), degrees=(0, 60, 0)), Part("cylinder", (0.2, 0.1), (0, 0, 0.1)),
                 Part("torus", (0.3, 0.05), degrees=(90, 0, 0))):
        vertices = torch.from_numpy(np.asarray(part.mesh().vertices)).float()
        assert float(part.distance(vertices).max()) < 2e-3, part.kind  # tessellation error only
        assert float(part.distance(vertices * 1.5 + 0.7).min()) > 1e-3, part.kind


def test_crossing_test_tracks_the_encoder() -> None:
    """At 32^3 the distance-based crossing test and the project's voxeliser agree on nearly every voxel."""
    obj = OBJECTS["teapot"]()
    encoded = obj.structure(32).long()
    grid = grid_coords(32)
    crossed = grid[obj.crosses(grid, 32)]
    key = lambda c: set(((c[:, 0] * 32 + c[:, 1]) * 32 + c[:, 2]).tolist())  # noqa: E731
    common = len(key(encoded) & key(crossed))
    assert common / len(key(encoded)) > 0.9 and common / len(key(crossed)) > 0.8


@pytest.mark.parametrize("pipeline_type", ["512", "1024_cascade"])
def test_tiny_pipeline_produces_the_objects_voxels(tiny_checkpoint, pipeline_type) -> None:
    pipe = Trellis2Pipeline.from_pretrained(str(tiny_checkpoint), device="cpu")
    models = pipe.store.models
    obj = OBJECTS["figure"]()
    ss_grid = 16  # tiny: the structure decoder makes 16^3, the latent grids are 8 (LR) and 16 (HR)
    ss_voxels = obj.structure(ss_grid)
    lr_tokens = torch.unique(ss_voxels.long() // 2, dim=0)
    models["sparse_structure_decoder"] = StructureOracle(models["sparse_structure_decoder"], ss_voxels, ss_grid)
    decoder = models["shape_slat_decoder"]
    state = SubdivisionState(obj, lr_tokens.shape[0], 8, decoder)
    settings = pipe.settings({"pipeline_type": pipeline_type, "sparse_structure_steps": 2, "shape_steps": 2,
                              "texture_steps": 2})
    with subdivision_oracle(decoder, state):
        out = pipe.run(disc_image(64), settings)
    assert "subdivision_logits" not in vars(decoder.blocks[0][-1])  # the method is back
    coords = torch.from_numpy(out.coords).long()
    resolution = out.resolution
    assert resolution == {"512": 128, "1024_cascade": 256}[pipeline_type] and coords.shape[0] > 0
    tokens = torch.unique(coords // 16, dim=0)
    if pipeline_type == "512":
        assert torch.equal(tokens, lr_tokens)  # the structure the flows saw is the object's
    assert out.metadata["tokens"] == tokens.shape[0]
    # Every voxel and each of its ancestors below the latent grid is crossed by the surface, and every crossed
    # child of a kept voxel is kept.
    for level in range(4):
        assert bool(obj.crosses(coords >> level, resolution >> level).all())
    parents = torch.unique(coords // 2, dim=0)
    children = (parents[:, None, :] * 2 + torch.tensor([[k & 1, k >> 1 & 1, k >> 2 & 1] for k in range(8)]))
    children = children.reshape(-1, 3)
    expected = children[obj.crosses(children, resolution)]
    assert expected.shape[0] == coords.shape[0]
    assert state.seconds > 0
