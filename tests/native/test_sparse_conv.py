"""Sub-manifold sparse conv: neighbour map properties and agreement with a dense F.conv3d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backend.native.sparse_conv as sparse_conv
from backend.native import VoxelIndex
from backend.native.sparse_conv import KERNEL_OFFSETS, build_neighbour_map, submanifold_conv3d


def random_voxels(seed: int, lengths: list[int], grid: int, device: str = "cpu") -> torch.Tensor:
    """int32 [N, 4] unique voxels per batch item, items contiguous, rows shuffled within each item."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b, n in enumerate(lengths):
        cells = torch.randperm(grid**3, generator=g)[:n]
        xyz = torch.stack([cells // grid**2, cells // grid % grid, cells % grid], dim=1)
        parts.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(parts).int().to(device)


def dense_conv(feats: torch.Tensor, coords: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same conv through a zero-filled dense grid and F.conv3d, read back at the active voxels."""
    b, x, y, z = coords.long().unbind(1)
    grid = int(coords[:, 1:].max()) + 1
    dense = feats.new_zeros(int(b.max()) + 1, feats.shape[1], grid, grid, grid)
    dense[b, :, x, y, z] = feats
    out = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), bias, padding=1)
    return out[b, :, x, y, z]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_dense_conv(dtype: torch.dtype, tol: float, seed: int) -> None:
    coords = random_voxels(seed, [120, 1, 75], grid=7)  # dense enough for many neighbours, incl. a lone voxel
    g = torch.Generator().manual_seed(100 + seed)
    feats = torch.randn(coords.shape[0], 5, generator=g, dtype=dtype)
    weight = torch.randn(9, 3, 3, 3, 5, generator=g, dtype=dtype)
    bias = torch.randn(9, generator=g, dtype=dtype)
    out = submanifold_conv3d(feats, build_neighbour_map(coords), weight, bias)
    torch.testing.assert_close(out, dense_conv(feats, coords, weight, bias), atol=tol, rtol=tol)


def test_no_bias_and_blocked_im2col_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    coords = random_voxels(3, [90, 60], grid=6)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(coords.shape[0], 4, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 3, 3, 3, 4, generator=g, dtype=torch.float64)
    neighbours = build_neighbour_map(coords)
    whole = submanifold_conv3d(feats, neighbours, weight)
    monkeypatch.setattr(sparse_conv, "IM2COL_BLOCK_ELEMENTS", 27 * 4 * 7)  # blocks of 7 rows, last one partial
    blocked = submanifold_conv3d(feats, neighbours, weight)
    torch.testing.assert_close(blocked, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(whole, dense_conv(feats, coords, weight, torch.zeros(6, dtype=torch.float64)))


def test_neighbour_map_matches_brute_force() -> None:
    coords = random_voxels(4, [40, 30, 20], grid=5)
    neighbours = build_neighbour_map(coords)
    assert neighbours.dtype == torch.int32 and neighbours.shape == (90, 27)
    row_of = {tuple(c): i for i, c in enumerate(coords.tolist())}
    expected = [
        [row_of.get((c[0], c[1] + dx, c[2] + dy, c[3] + dz), -1) for dx, dy, dz in KERNEL_OFFSETS.tolist()]
        for c in coords.tolist()
    ]
    assert neighbours.tolist() == expected


def test_neighbour_map_properties() -> None:
    coords = random_voxels(5, [200, 150], grid=8)
    neighbours = build_neighbour_map(coords).long()
    n = coords.shape[0]
    assert torch.equal(neighbours[:, 13], torch.arange(n))  # the centre tap is the voxel itself
    i, v = (neighbours >= 0).nonzero(as_tuple=True)
    j = neighbours[i, v]
    assert torch.equal(neighbours[j, 26 - v], i)  # symmetric: the opposite tap points back
    assert torch.equal(coords[j, 0], coords[i, 0])  # never across batch items
    assert torch.equal(coords[j, 1:] - coords[i, 1:], KERNEL_OFFSETS[v].int())


def test_row_order_does_not_matter() -> None:
    coords = random_voxels(6, [80, 50], grid=6)
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(coords.shape[0], 3, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    out = submanifold_conv3d(feats, build_neighbour_map(coords), weight)
    perm = torch.randperm(coords.shape[0], generator=g)
    out_perm = submanifold_conv3d(feats[perm], build_neighbour_map(coords[perm]), weight)
    torch.testing.assert_close(out_perm, out[perm], atol=1e-12, rtol=0)


def test_voxel_index_misses() -> None:
    index = VoxelIndex(torch.tensor([[0, 2, 3], [1, 0, 0], [0, 2, 4]]))
    queries = torch.tensor([[0, 2, 4], [1, 0, 0], [0, 2, 5], [-1, 0, 0], [0, 3, 3], [9, 9, 9]])
    assert index.lookup(queries).tolist() == [2, 1, -1, -1, -1, -1]
    assert VoxelIndex(torch.zeros(0, 3, dtype=torch.int32)).lookup(queries).tolist() == [-1] * 6


def test_rejects_mismatched_inputs() -> None:
    coords = random_voxels(7, [10], grid=4)
    neighbours = build_neighbour_map(coords)
    with pytest.raises(ValueError):
        submanifold_conv3d(torch.randn(10, 3), neighbours, torch.randn(2, 3, 3, 3, 4))
    with pytest.raises(TypeError):
        submanifold_conv3d(torch.randn(10, 4), neighbours, torch.randn(2, 3, 3, 3, 4, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu() -> None:
    coords = random_voxels(8, [3000, 2000], grid=24)
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(coords.shape[0], 64, generator=g)
    weight = torch.randn(32, 3, 3, 3, 64, generator=g) / 40
    bias = torch.randn(32, generator=g)
    expected = submanifold_conv3d(feats, build_neighbour_map(coords), weight, bias)
    neighbours = build_neighbour_map(coords.cuda())
    assert torch.equal(neighbours.cpu(), build_neighbour_map(coords))
    fp32 = submanifold_conv3d(feats.cuda(), neighbours, weight.cuda(), bias.cuda())
    torch.testing.assert_close(fp32.cpu(), expected, atol=1e-4, rtol=1e-4)  # TF32 is off by default for matmul
    fp16 = submanifold_conv3d(feats.cuda().half(), neighbours, weight.cuda().half(), bias.cuda().half())
    torch.testing.assert_close(fp16.float().cpu(), expected, atol=2e-2, rtol=2e-2)
