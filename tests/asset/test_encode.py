"""Mesh -> O-Voxel encoder: geometry round trips (Chamfer in voxels), closedness, the reference's voxel and flag
definition, the box-constrained QEF, split weights, and PBR attributes from colours, textures and alpha."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from backend.ovoxel.dual_grid import QUAD_OFFSETS
from backend.ovoxel.encode import (
    Material,
    SurfaceMesh,
    decode_dual_grid,
    encode_mesh,
    mesh_to_dual_grid,
)
from backend.native import VoxelIndex
from backend.ovoxel.nearest import closest_on_triangles
from backend.ovoxel.ovoxel import OVoxel
from backend.ovoxel.voxelizer import _face_cells, _planes, solve_box_qef

R = 32


# ---------------------------------------------------------------------------------------------------------------
# Shapes and measures


def _mesh(m: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces)


def rotated_cube() -> trimesh.Trimesh:
    m = trimesh.creation.box((0.5, 0.5, 0.5))
    m.apply_transform(trimesh.transformations.euler_matrix(0.3, 0.5, 0.7))
    return m


def wavy_sheet(n: int = 30) -> trimesh.Trimesh:
    """Open sheet over [-0.35, 0.35]^2 with UVs u = x + 0.5, v = y + 0.5 (kept as vertex attribute 'uv')."""
    x, y = np.meshgrid(np.linspace(-0.35, 0.35, n), np.linspace(-0.35, 0.35, n), indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), 0.1 * np.sin(5 * x.ravel()) * np.cos(4 * y.ravel())], axis=1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    return trimesh.Trimesh(v, np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]), process=False)


def fin_fan() -> trimesh.Trimesh:
    """Three rectangular fins sharing the edge x = y = 0: a non-manifold edge used by 3 faces' quads."""
    verts, faces = [], []
    for k, angle in enumerate((0.1, 2.2, 4.2)):
        d = np.array([np.cos(angle), np.sin(angle), 0.0]) * 0.35
        verts += [[0, 0, -0.3], [0, 0, 0.3], d + [0, 0, 0.3], d + [0, 0, -0.3]]
        faces += [[4 * k, 4 * k + 1, 4 * k + 2], [4 * k, 4 * k + 2, 4 * k + 3]]
    m = trimesh.Trimesh(np.array(verts), np.array(faces))
    m.merge_vertices()
    return m


def box_in_box() -> trimesh.Trimesh:
    inner = trimesh.creation.box((0.3, 0.25, 0.35))
    inner.apply_translation([0.03, 0.02, -0.01])
    return trimesh.util.concatenate([trimesh.creation.box((0.7, 0.6, 0.65)), inner])


SHAPES = {
    "sphere": lambda: trimesh.creation.icosphere(3, radius=0.35),
    "torus": lambda: trimesh.creation.torus(0.28, 0.1, 48, 24),
    "grid_aligned_box": lambda: trimesh.creation.box((0.5, 0.5, 0.5)),  # every face on a grid plane
    "rotated_cube": rotated_cube,
    "sheet": wavy_sheet,
    "fan": fin_fan,
    "box_in_box": box_in_box,
    "thin_slab": lambda: trimesh.creation.box((0.6, 0.6, 0.004)),  # 0.13 voxel thick
}
# The rotated cube is closed too, but its sharp edges cross some grid edges twice; as in the reference those stay
# flagged (that is what keeps thin parts), which leaves a few non-manifold edges there.
CLOSED = {"sphere", "torus", "grid_aligned_box", "box_in_box", "thin_slab"}
# Mean Chamfer bound per shape, in voxels (measured 0.008, 0.011, 0.0004, 0.003, 0.003, 0.0001, 0.0004, 0.0001).
CHAMFER_BOUND = {"sphere": 0.02, "torus": 0.025, "rotated_cube": 0.01, "sheet": 0.01}


def sample_surface(v: np.ndarray, f: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = v[f]
    area = np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)
    idx = rng.choice(len(f), n, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(n)), rng.random(n)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    return (bary[:, :, None] * t[idx]).sum(axis=1)


def distance_to_mesh(points: np.ndarray, v: np.ndarray, f: np.ndarray, k: int = 16) -> np.ndarray:
    """Distance to the nearest of the k triangles with the nearest centroids (exact for k >= F; an upper
    bound otherwise, which only makes the tests stricter)."""
    centroids = torch.from_numpy(v[f].mean(axis=1))
    k = min(k, len(f))
    out = []
    for chunk in torch.split(torch.from_numpy(points), 2048):
        idx = torch.cdist(chunk, centroids).topk(k, largest=False).indices.numpy()
        p = np.repeat(chunk.numpy()[:, None], k, axis=1).reshape(-1, 3)
        a, b, c = (v[f[idx, j]].reshape(-1, 3) for j in range(3))
        bary = closest_on_triangles(*(torch.from_numpy(x) for x in (p, a, b, c))).numpy()
        nearest = bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c
        out.append(np.linalg.norm(nearest - p, axis=1).reshape(-1, k).min(axis=1))
    return np.concatenate(out)


def chamfer(src: tuple[np.ndarray, np.ndarray], out: tuple[np.ndarray, np.ndarray], n: int = 4000):
    """(out -> src distances, src -> out distances) of surface samples."""
    return (distance_to_mesh(sample_surface(*out, n, 1), *src), distance_to_mesh(sample_surface(*src, n, 2), *out))


def used(v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep, inverse = np.unique(f, return_inverse=True)
    return v[keep].astype(np.float64), inverse.reshape(-1, 3)


def edge_uses(f: np.ndarray) -> np.ndarray:
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(e, axis=0, return_counts=True)[1]


# ---------------------------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_geometry(name: str) -> None:
    v, f = _mesh(SHAPES[name]())
    ov = encode_mesh(SurfaceMesh(v, f), R)
    d_out, d_src = chamfer((v, f), used(ov.vertices, ov.faces))
    bound = CHAMFER_BOUND.get(name, 0.005)
    assert d_out.mean() * R < bound and d_src.mean() * R < bound, (d_out.mean() * R, d_src.mean() * R)
    assert max(d_out.max(), d_src.max()) * R < 0.35  # nowhere off by more than a third of a voxel
    if name in CLOSED:
        assert (edge_uses(ov.faces) == 2).all(), "a closed source must decode to a closed 2-manifold"


def test_box_in_box_keeps_both_shells() -> None:
    v, f = _mesh(box_in_box())
    ov = encode_mesh(SurfaceMesh(v, f), R)
    parts = trimesh.Trimesh(*used(ov.vertices, ov.faces), process=False).split(only_watertight=False)
    assert len(parts) == 2
    assert sorted(round(float(p.area), 2) for p in parts) == sorted(round(float(m.area), 2) for m in
                                                                    box_in_box().split(only_watertight=False))


def test_voxels_and_flags_match_brute_force_edge_crossings() -> None:
    """The reference's definition, computed naively: every interior grid line (I, J) along axis a inside a
    triangle's projection gives a crossing; the 4 cells around it exist and the lower one is flagged."""
    res = 8
    m = trimesh.creation.icosphere(1, radius=0.37)
    v = np.asarray(m.vertices) + np.random.default_rng(0).normal(0, 0.01, (len(m.vertices), 3))
    grid = mesh_to_dual_grid(v, np.asarray(m.faces), res)
    p = (v + 0.5) * res
    cells, flags = set(), set()
    for tri in p[np.asarray(m.faces)]:
        for axis in range(3):
            a0, a1 = (axis + 1) % 3, (axis + 2) % 3
            for i in range(1, res):
                for j in range(1, res):
                    uv = tri[:, [a0, a1]]
                    mat = np.array([uv[1] - uv[0], uv[2] - uv[0]]).T
                    if abs(np.linalg.det(mat)) < 1e-12:
                        continue
                    s, t = np.linalg.solve(mat, np.array([i, j]) - uv[0])
                    if s <= 0 or t <= 0 or s + t >= 1:
                        continue
                    height = tri[0, axis] + s * (tri[1, axis] - tri[0, axis]) + t * (tri[2, axis] - tri[0, axis])
                    k = int(np.floor(height))
                    lower = [0, 0, 0]
                    lower[a0], lower[a1], lower[axis] = i - 1, j - 1, k
                    flags.add((*lower, axis))
                    for di in (0, 1):
                        for dj in (0, 1):
                            c = list(lower)
                            c[a0] += di
                            c[a1] += dj
                            cells.add(tuple(c))
    assert {tuple(c) for c in grid.coords.tolist()} == cells
    got = {(*grid.coords[i].tolist(), a) for i, a in zip(*np.nonzero(grid.intersected))}
    assert got == flags


def _separation(tri: np.ndarray, box_min: np.ndarray) -> float:
    """Largest gap between a triangle and the unit box along the 13 separating axes (> 0: apart, <= 0: touching)."""
    v = tri - (box_min + 0.5)
    e = [v[1] - v[0], v[2] - v[1], v[0] - v[2]]
    axes = [*np.eye(3), np.cross(e[0], e[1]), *(np.cross(a, b) for a in np.eye(3) for b in e)]
    gap = -np.inf
    for a in axes:
        norm = np.linalg.norm(a)
        if norm < 1e-12:
            continue
        a = a / norm
        reach, proj = 0.5 * np.abs(a).sum(), v @ a
        gap = max(gap, proj.min() - reach, -reach - proj.max())
    return gap


def test_face_term_cells_are_exactly_the_overlapped_cells() -> None:
    """The face QEF's (triangle, cell) pairs, found per column along the normal with the reference's float32
    test, are the bounding-box cells a separating-axis test says the triangle touches (up to float32 slack)."""
    res = 8
    rng = np.random.default_rng(1)
    v, f = _mesh(trimesh.creation.icosphere(1, radius=0.4))
    big = rng.uniform(-0.45, 0.45, (12, 3, 3))  # long slanted triangles spanning many cells
    tri = torch.from_numpy(np.concatenate([(v + 0.5)[f], big + 0.5])).float()
    normal, offset = _planes(tri)
    vs = torch.tensor(1.0) / res
    got = {(t, tuple(c)) for t_id, cells in _face_cells(tri, normal, offset, vs, res)
           for t, c in zip(t_id.tolist(), cells.tolist())}
    for t, corners in enumerate(tri.double().numpy() * res):
        lo, hi = np.floor(corners.min(0)).astype(int), np.floor(corners.max(0)).astype(int)
        box = np.meshgrid(*[np.arange(max(lo[k], 0), min(hi[k], res - 1) + 1) for k in range(3)], indexing="ij")
        for c in np.stack(box, -1).reshape(-1, 3):
            gap = _separation(corners, c.astype(float))
            if abs(gap) > 1e-4:  # clear of float32 rounding: the two tests must agree
                assert ((t, tuple(c.tolist())) in got) == (gap < 0), (t, c, gap)


def test_dual_vertices_stay_in_their_voxel_and_lie_on_planes() -> None:
    v, f = _mesh(rotated_cube())
    grid = mesh_to_dual_grid(v, f, R)
    assert (grid.dual_vertices >= 0).all() and (grid.dual_vertices <= 1).all()
    world = (grid.coords + grid.dual_vertices) / R - 0.5
    d = distance_to_mesh(world.astype(np.float64), v, f)
    assert np.median(d) * R < 0.01  # flat faces: the QEF puts the vertex on the plane


def test_boundary_term_keeps_an_open_sheet_full_size() -> None:
    """Without the boundary lines the regularisation pulls rim vertices in by up to half a voxel."""
    n = 9
    x, y = np.meshgrid(np.linspace(-0.3, 0.3, n), np.linspace(-0.3, 0.3, n), indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), np.full(n * n, 0.0123)], axis=1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    grid = mesh_to_dual_grid(v, np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]), R)
    world = (grid.coords + grid.dual_vertices.astype(np.float64)) / R - 0.5
    np.testing.assert_allclose(world[:, :2].min(axis=0), -0.3, atol=0.1 / R)
    np.testing.assert_allclose(world[:, :2].max(axis=0), 0.3, atol=0.1 / R)
    np.testing.assert_allclose(world[:, 2], 0.0123, atol=1e-5)


def test_box_qef_solver_finds_the_box_constrained_minimum() -> None:
    rng = np.random.default_rng(3)
    n = 200
    planes = rng.normal(size=(n, 3, 4))
    planes[..., :3] /= np.linalg.norm(planes[..., :3], axis=2, keepdims=True)
    q = np.einsum("npi,npj->nij", planes, planes)
    q[:, [0, 1, 2], [0, 1, 2]] += 1e-2  # regularisation towards the origin keeps it well-posed
    q = q.astype(np.float32)
    lo = rng.integers(-3, 3, size=(n, 3)).astype(np.float32)
    x = solve_box_qef(torch.from_numpy(q), torch.from_numpy(lo), torch.from_numpy(lo + 1)).double().numpy()
    assert ((x >= lo) & (x <= lo + 1)).all()
    axis = np.linspace(0, 1, 21)
    lattice = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    for i in range(n):
        pts = np.concatenate([lattice + lo[i], x[i:i + 1]])
        ph = np.concatenate([pts, np.ones((len(pts), 1))], axis=1)
        err = np.einsum("pi,ij,pj->p", ph, q[i].astype(np.float64), ph)
        # float32 arithmetic, as the reference: the minimum is found up to the rounding of its error values
        assert err[-1] <= err[:-1].min() + 1e-6 * np.abs(q[i]).sum(), i


def test_split_weights_reproduce_the_flatter_diagonal() -> None:
    v, f = _mesh(trimesh.creation.torus(0.28, 0.1, 48, 24))
    grid = mesh_to_dual_grid(v, f, R)
    c = torch.from_numpy(grid.coords).long()
    voxel, axis = torch.from_numpy(grid.intersected).nonzero(as_tuple=True)
    rows = VoxelIndex(c).lookup((c[voxel].unsqueeze(1) + QUAD_OFFSETS[axis]).reshape(-1, 3)).reshape(-1, 4)
    q = rows[(rows >= 0).all(dim=1)].numpy()
    p = (grid.coords + grid.dual_vertices.astype(np.float64))[q]

    def angle(a, b):
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
        return np.arccos(np.clip(cos, -1, 1))

    a02 = angle(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), np.cross(p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]))
    a13 = angle(np.cross(p[:, 1] - p[:, 0], p[:, 3] - p[:, 0]), np.cross(p[:, 2] - p[:, 1], p[:, 3] - p[:, 1]))
    w = grid.split_weight[q, 0]
    chosen_02 = w[:, 0] * w[:, 2] > w[:, 1] * w[:, 3]
    agree = chosen_02 == (a02 <= a13)
    importance = np.abs(a02 - a13)
    assert (importance * agree).sum() / importance.sum() > 0.999
    assert (grid.split_weight > 0).all()


def test_encoded_ovoxel_saves_and_decodes_to_its_mesh(tmp_path) -> None:
    v, f = _mesh(trimesh.creation.icosphere(2, radius=0.3))
    ov = encode_mesh(SurfaceMesh(v, f), 16, metadata={"source": "test"})
    ov.save(tmp_path / "x.npz")
    back = OVoxel.load(tmp_path / "x.npz")
    assert back.metadata == {"source": "test"} and back.resolution == 16
    for name in ("coords", "attrs", "vertices", "faces", "dual_vertices", "intersected", "split_weight"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ov, name))
    dv, df = decode_dual_grid(back)
    np.testing.assert_array_equal(dv, ov.vertices)
    np.testing.assert_array_equal(df, ov.faces)
    plain = OVoxel.from_bytes(OVoxel(ov.coords, ov.attrs, 16, ov.vertices, ov.faces).to_bytes())
    assert plain.dual_vertices is None and plain.split_weight is None
    with pytest.raises(ValueError, match="no dual grid"):
        decode_dual_grid(plain)


def test_bad_inputs_are_refused() -> None:
    v, f = _mesh(trimesh.creation.icosphere(1, radius=0.3))
    with pytest.raises(ValueError, match="inside"):
        encode_mesh(SurfaceMesh(v * 3, f), 16)
    with pytest.raises(ValueError, match="out of range"):
        encode_mesh(SurfaceMesh(v, f + len(v)), 16)
    tiny = np.array([[0.01, 0.01, 0.01], [0.02, 0.01, 0.01], [0.01, 0.02, 0.01]])
    with pytest.raises(ValueError, match="crosses no edge"):
        encode_mesh(SurfaceMesh(tiny, np.array([[0, 1, 2]])), 16)


# ---------------------------------------------------------------------------------------------------------------
# Attributes


def srgb(linear: np.ndarray) -> np.ndarray:
    """sRGB encoding (IEC 61966-2-1), written out here independently of the encoder's."""
    linear = np.asarray(linear, dtype=np.float64)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def test_constant_material_fills_every_voxel() -> None:
    """glTF's baseColorFactor is linear; voxels hold sRGB-encoded colour like texture values (0.2 -> 124/255)."""
    v, f = _mesh(trimesh.creation.icosphere(2, radius=0.3))
    ov = encode_mesh(SurfaceMesh(v, f, material=Material(base_color=(0.2, 0.4, 0.6, 1.0), metallic=0.3,
                                                          roughness=0.8)), 16)
    expected = [0.484529, 0.665185, 0.797738, 0.3, 0.8, 1.0]  # sRGB of (0.2, 0.4, 0.6); metal/rough/alpha linear
    np.testing.assert_allclose(ov.attrs, np.tile(expected, (len(ov.attrs), 1)), atol=1e-5)


def test_vertex_colours_follow_the_surface() -> None:
    m = trimesh.creation.icosphere(4, radius=0.35)
    v, f = _mesh(m)
    normal = v / np.linalg.norm(v, axis=1, keepdims=True)
    ov = encode_mesh(SurfaceMesh(v, f, vertex_colors=0.5 + 0.5 * normal), R)  # linear, as glTF's COLOR_0
    centre = (ov.coords + 0.5) / R - 0.5
    expected = srgb(0.5 + 0.5 * centre / np.linalg.norm(centre, axis=1, keepdims=True))
    err = np.abs(ov.attrs[:, :3] - expected)
    assert err.mean() < 0.01 and err.max() < 0.06
    assert np.allclose(ov.attrs[:, 5], 1.0)  # OPAQUE ignores colour alpha


def _sheet_with_texture(alpha_mode: str, cutoff: float = 0.5) -> OVoxel:
    m = wavy_sheet()
    v, f = _mesh(m)
    uv = v[:, :2] + 0.5
    t = (np.arange(256) + 0.5) / 256
    tex = np.zeros((256, 256, 4), np.uint8)
    tex[..., 0] = np.round(255 * t)[None, :]  # red = u
    tex[..., 1] = np.round(255 * (1 - t))[:, None]  # green = v (row 0 is the top, v = 1)
    tex[..., 3] = np.where(t < 0.5, 255, 0)[None, :]  # opaque for u < 0.5, clear beyond
    mr = np.zeros((4, 4, 3), np.uint8)
    mr[..., 1], mr[..., 2] = 64, 192  # roughness 0.25, metallic 0.75
    material = Material(base_color_texture=tex, metallic_roughness_texture=mr, metallic=1.0, roughness=1.0,
                        alpha_mode=alpha_mode, alpha_cutoff=cutoff)
    return encode_mesh(SurfaceMesh(v, f, uvs=uv, material=material), R)


def test_texture_colours_and_metal_rough_channels() -> None:
    ov = _sheet_with_texture("OPAQUE")
    centre = (ov.coords + 0.5) / R - 0.5
    err = np.abs(ov.attrs[:, :2] - (centre[:, :2] + 0.5))
    assert err.mean() < 0.01 and err.max() < 0.04  # the red/green gradients land where their UVs are
    np.testing.assert_allclose(ov.attrs[:, 3], 192 / 255, atol=1e-6)  # metallic from B
    np.testing.assert_allclose(ov.attrs[:, 4], 64 / 255, atol=1e-6)  # roughness from G
    assert np.allclose(ov.attrs[:, 5], 1.0)


@pytest.mark.parametrize("mode", ["BLEND", "MASK"])
def test_texture_alpha(mode: str) -> None:
    ov = _sheet_with_texture(mode)
    x = (ov.coords[:, 0] + 0.5) / R - 0.5
    alpha = ov.attrs[:, 5]
    assert (alpha[x < -2 / R] > 0.99).all() and (alpha[x > 2 / R] < 0.01).all()
    if mode == "MASK":  # every sample is 0 or 1; a voxel averages a few
        assert ((alpha == 0) | (alpha == 1)).mean() > 0.9


def test_parts_keep_their_own_materials() -> None:
    a, b = trimesh.creation.icosphere(2, radius=0.15), trimesh.creation.icosphere(2, radius=0.15)
    a.apply_translation([-0.25, 0, 0])
    b.apply_translation([0.25, 0, 0])
    red, blue = Material(base_color=(1, 0, 0, 1)), Material(base_color=(0, 0, 1, 1))
    ov = encode_mesh([SurfaceMesh(*_mesh(a), material=red), SurfaceMesh(*_mesh(b), material=blue)], R)
    left = ov.coords[:, 0] < R // 2
    np.testing.assert_allclose(ov.attrs[left, :3], np.tile([1, 0, 0], (left.sum(), 1)))
    np.testing.assert_allclose(ov.attrs[~left, :3], np.tile([0, 0, 1], ((~left).sum(), 1)))
