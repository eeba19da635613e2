"""Texturing models: the reference's golden cases for the voxeliser, spatial-to-channel, the shape encoder and the
pipeline glue; the encoder's 4B state-dict layout; the decoder following an encoder's voxel hierarchy."""

from __future__ import annotations

import json

import pytest
import torch

from backend.__main__ import main as cli
from backend.golden.texturing import _xyz_order, occupancy_guides
from backend.trellis2.sc_vae import SparseUnetVaeDecoder, spatial_to_channel
from backend.trellis2.sc_vae_encoder import FlexiDualGridVaeEncoder
from backend.trellis2.sparse import SparseTensor

GOLDEN_CASES = ["mesh_to_dual_grid_a", "spatial2channel_a", "shape_encoder_a", "texturing_glue_a"]
ENCODER = dict(model_channels=[8, 16, 16], latent_channels=4, num_blocks=[0, 1, 1],
               block_type=["SparseConvNeXtBlock3d"] * 3, down_block_type=["SparseResBlockS2C3d"] * 2)
DECODER = dict(out_channels=6, model_channels=[16, 16, 8], latent_channels=4, num_blocks=[1, 1, 0],
               block_type=["SparseConvNeXtBlock3d"] * 3, up_block_type=["SparseResBlockC2S3d"] * 2,
               pred_subdiv=False)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_case(name: str, golden_failures) -> None:
    checks, failed = golden_failures(name)
    assert checks and not failed, failed


def test_encoder_state_dict_matches_4b_manifest(load_manifest) -> None:
    manifest = load_manifest("shape_slat_encoder")
    with torch.device("meta"):
        model = FlexiDualGridVaeEncoder(**manifest["args"])
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch."), "param"] for k, v in model.state_dict().items()]
    assert ours == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]


def test_manifest_command_prints_the_encoder_manifest(load_manifest, tmp_path, capsys) -> None:
    manifest = load_manifest("shape_slat_encoder")
    cfg = tmp_path / "shape_enc.json"
    cfg.write_text(json.dumps({"name": manifest["class_name"], "args": manifest["args"]}))
    assert cli(["manifest", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out) == [entry[:3] for entry in manifest["state_dict"]]


def _voxels(seed: int, n: int = 300) -> torch.Tensor:
    """Unique random voxels of one batch item in a 16^3 grid, in random order."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(16**3, generator=g)[:n]
    return torch.stack([torch.zeros_like(cells), cells // 256, cells // 16 % 16, cells % 16], dim=1).int()


def test_spatial_to_channel_zero_fills_absent_children_and_inverts() -> None:
    coords = _voxels(0)
    x = SparseTensor(torch.randn(coords.shape[0], 3), coords)
    y = spatial_to_channel(x)
    assert torch.equal(y.coords[:, 1:], torch.unique(coords[:, 1:] // 2, dim=0).int())  # sorted unique parents
    blocks = y.feats.reshape(-1, 8, 3)
    present = blocks.abs().sum(dim=2) > 0
    assert present.sum() == coords.shape[0]  # one non-zero block per child, the rest zero
    for i in (0, 57, 199):  # child k = x%2 + 2(y%2) + 4(z%2) of its parent
        c = coords[i, 1:].long()
        row = int(((y.coords[:, 1:] == (c // 2).int()).all(dim=1)).nonzero())
        k = int(c[0] % 2 + 2 * (c[1] % 2) + 4 * (c[2] % 2))
        assert torch.equal(blocks[row, k], x.feats[i])
    assert spatial_to_channel(x.replace(x.feats * 2)).coords is y.coords  # parents computed once per voxel set


def test_decoder_reexpands_the_encoder_hierarchy_in_voxel_order() -> None:
    """Without guides, a pred_subdiv=False decoder follows the encoder's levels back to its input voxels and order;
    guided by the same occupancy on a latent without the hierarchy, it reaches the same voxels (parent-major
    order) with the same features."""
    torch.manual_seed(0)
    encoder, decoder = FlexiDualGridVaeEncoder(**ENCODER).eval(), SparseUnetVaeDecoder(**DECODER).eval()
    coords = _voxels(1)
    with torch.no_grad():
        z = encoder(SparseTensor(torch.rand(coords.shape[0], 3), coords),
                    SparseTensor(torch.rand(coords.shape[0], 3) > 0.5, coords))
        out = decoder(z)
        guided = decoder(SparseTensor(z.feats.clone(), z.coords.clone()), guide_subs=occupancy_guides(z))
    assert torch.equal(out.coords, coords)
    mine, theirs = _xyz_order(out.coords), _xyz_order(guided.coords)
    assert torch.equal(out.coords[mine], guided.coords[theirs])
    torch.testing.assert_close(out.feats[mine], guided.feats[theirs], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no encoder hierarchy"), torch.no_grad():
        decoder(SparseTensor(z.feats.clone(), z.coords.clone()))
