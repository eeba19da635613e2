"""Closest-point search against brute force, and the trilinear sampling rule of spec §7.3."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from asset_shapes import uv_sphere

from backend.ovoxel.nearest import closest_on_triangles, closest_points
from backend.asset.sampling import sample_trilinear
from backend.native import VoxelIndex


def brute_force(v: torch.Tensor, f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    tri = v.double()[f.long()]
    m, n = p.shape[0], tri.shape[0]
    pp = p.double().repeat_interleave(n, dim=0)
    tt = tri.repeat(m, 1, 1)
    w = closest_on_triangles(pp, tt[:, 0], tt[:, 1], tt[:, 2])
    q = (w.unsqueeze(2) * tt).sum(dim=1)
    return (q - pp).norm(dim=1).reshape(m, n).amin(dim=1)


def test_closest_point_regions_match_dense_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    tri = torch.randn(200, 3, 3, generator=g, dtype=torch.float64)
    p = torch.randn(200, 3, generator=g, dtype=torch.float64) * 2
    w = closest_on_triangles(p, tri[:, 0], tri[:, 1], tri[:, 2])
    assert bool((w >= -1e-12).all()) and torch.allclose(w.sum(dim=1), torch.ones(200, dtype=torch.float64))
    d = ((w.unsqueeze(2) * tri).sum(dim=1) - p).norm(dim=1)
    s = torch.linspace(0, 1, 60, dtype=torch.float64)
    a, b = torch.meshgrid(s, s, indexing="ij")
    keep = (a + b) <= 1
    bary = torch.stack([1 - a[keep] - b[keep], a[keep], b[keep]], dim=1)  # [K, 3]
    dense = torch.einsum("kj,njc->nkc", bary, tri)
    d_dense = (dense - p.unsqueeze(1)).norm(dim=2).amin(dim=1)
    assert bool((d <= d_dense + 1e-12).all()) and float((d_dense - d).max()) < 0.05


def test_grid_search_equals_brute_force_near_and_far() -> None:
    v, f = uv_sphere(16, 24)
    g = torch.Generator().manual_seed(3)
    near = v[torch.randint(0, v.shape[0], (300,), generator=g)] + 0.01 * torch.randn(300, 3, generator=g)
    far = torch.randn(100, 3, generator=g)  # up to several radii away: found by the growing search
    p = torch.cat([near, far])
    got = closest_points(v, f, p, radius=0.005)
    assert bool((got.face >= 0).all())
    assert torch.allclose(got.distance.double(), brute_force(v, f, p), atol=1e-6)
    assert torch.allclose((got.point - p).norm(dim=1), got.distance, atol=1e-6)


def test_max_radius_leaves_far_points_unresolved() -> None:
    v, f = uv_sphere(16, 24)
    p = torch.tensor([[0.0, 0.0, 0.41], [0.0, 0.0, 0.9]])
    got = closest_points(v, f, p, radius=0.05, max_radius=0.05)
    assert got.face[0] >= 0 and got.face[1] == -1 and torch.isinf(got.distance[1])


def reference_trilinear(coords: np.ndarray, attrs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Spec §7.3 written out point by point."""
    table = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = np.zeros((q.shape[0], attrs.shape[1]))
    for m, x in enumerate(q):
        base = np.floor(x - 0.5).astype(int)
        acc, total = np.zeros(attrs.shape[1]), 0.0
        for dx, dy, dz in itertools.product((0, 1), repeat=3):
            c = base + (dx, dy, dz)
            if tuple(c) in table:
                w = np.prod(1 - np.abs(x - (c + 0.5)))
                acc += w * attrs[table[tuple(c)]]
                total += w
        out[m] = acc / max(total, 1e-12)
    return out


def test_trilinear_sampling_follows_the_reference_rule() -> None:
    rng = np.random.default_rng(0)
    coords = np.unique(rng.integers(0, 6, size=(120, 3)), axis=0)
    attrs = rng.random((coords.shape[0], 6)).astype(np.float32)
    q = rng.random((400, 3)) * 7 - 0.5
    got = sample_trilinear(VoxelIndex(torch.from_numpy(coords)), torch.from_numpy(attrs), torch.from_numpy(q))
    np.testing.assert_allclose(got.numpy(), reference_trilinear(coords, attrs, q), atol=1e-5)


def test_trilinear_reproduces_linear_fields_and_renormalises_at_the_edge() -> None:
    axis = torch.arange(4)
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    attrs = (coords.float() + 0.5) @ torch.tensor([[1.0], [2.0], [-1.0]])  # linear in the voxel centre
    index = VoxelIndex(coords)
    q = torch.tensor([[1.2, 2.7, 0.9], [2.0, 2.0, 2.0]])
    assert torch.allclose(sample_trilinear(index, attrs, q).squeeze(1), q @ torch.tensor([1.0, 2.0, -1.0]), atol=1e-5)
    edge = torch.tensor([[0.1, 0.5, 0.5]])  # half its neighbours are missing: weights renormalise
    assert torch.allclose(sample_trilinear(index, attrs, edge), attrs[index.lookup(torch.tensor([[0, 0, 0]]))])
    assert float(sample_trilinear(index, attrs, torch.tensor([[20.0, 20.0, 20.0]]))) == 0.0
