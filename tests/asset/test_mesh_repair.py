"""Orientation, cleanup, small-hole filling and cut closing on meshes with known topology."""

from __future__ import annotations

import torch
from asset_shapes import sheet, sphere_sdf, uv_sphere, voxelize

from backend.asset.cleanup import clean, remove_degenerate_and_duplicate_faces, remove_opposite_pairs
from backend.asset.cuts import close_cuts
from backend.asset.orientation import unify_orientation
from backend.asset.holes import fill_small_holes
from backend.asset.meshutil import compact, connected_components, edges_of


def directed_edges_agree(faces: torch.Tensor) -> bool:
    """Every edge with two faces is walked once each way (consistent winding)."""
    start, end = faces.long(), faces.long().roll(-1, dims=1)
    n = int(faces.max()) + 1
    directed = (start * n + end).reshape(-1)
    reverse = (end * n + start).reshape(-1)
    edges = edges_of(faces, n)
    interior = edges.count[edges.of_side.reshape(-1)] == 2
    return bool(torch.isin(reverse[interior], directed).all())


def signed_volume(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    p = vertices.double()[faces.long()]
    return float((p[:, 0] * torch.linalg.cross(p[:, 1], p[:, 2])).sum() / 6)


def test_connected_components_labels_each_component_by_its_smallest_node() -> None:
    u = torch.tensor([5, 1, 2, 7, 8])
    v = torch.tensor([4, 2, 3, 8, 9])
    label = connected_components(10, u, v)
    assert label.tolist() == [0, 1, 1, 1, 4, 4, 6, 7, 7, 7]


def test_unify_orientation_repairs_random_flips_and_faces_outwards() -> None:
    v, f = uv_sphere(24, 32)
    g = torch.Generator().manual_seed(0)
    flip = torch.rand(f.shape[0], generator=g) < 0.5
    scrambled = torch.where(flip[:, None], f[:, [0, 2, 1]], f)
    assert not directed_edges_agree(scrambled)
    fixed = unify_orientation(v, scrambled)
    assert torch.equal(fixed, f)
    inverted = unify_orientation(v, f[:, [0, 2, 1]])  # all faces inwards: the whole component turns
    assert torch.equal(inverted, f)


def test_decoded_dual_grid_mesh_becomes_consistent_and_outward() -> None:
    ov = voxelize(sphere_sdf((0.05, 0, 0), 0.3), 32)
    v, f = torch.from_numpy(ov.vertices), torch.from_numpy(ov.faces)
    assert not directed_edges_agree(f)  # the decoder's fixed per-axis corner order
    v, f = clean(v, f)
    f = unify_orientation(v, f)
    assert directed_edges_agree(f)
    assert abs(signed_volume(v, f) - 4 / 3 * torch.pi * 0.3**3) < 0.03 * 4 / 3 * torch.pi * 0.3**3


def test_degenerate_and_duplicate_faces_go() -> None:
    f = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 1, 3], [0, 2, 1], [1, 2, 3]], dtype=torch.int32)
    out = remove_degenerate_and_duplicate_faces(f)
    assert out.tolist() == [[0, 1, 2], [1, 2, 3]]


def test_a_flat_pillow_goes_whole_instead_of_leaving_a_triangular_hole() -> None:
    """Faces 1 and 2 cover the same corners wound opposite ways (a doubled one-face sheet): both go; face 3
    repeats face 0's winding and is left to the duplicate rule."""
    f = torch.tensor([[0, 1, 2], [3, 4, 5], [4, 3, 5], [1, 2, 0]], dtype=torch.int32)
    assert remove_opposite_pairs(f).tolist() == [[0, 1, 2], [1, 2, 0]]
    assert remove_degenerate_and_duplicate_faces(remove_opposite_pairs(f)).tolist() == [[0, 1, 2]]


def punch(faces: torch.Tensor, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(faces.shape[0], dtype=torch.bool)
    keep[drop] = False
    return faces[keep]


def boundary_sides(faces: torch.Tensor, n: int) -> int:
    return int((edges_of(faces, n).count == 1).sum())


def test_small_hole_closes_large_hole_stays() -> None:
    v, f = uv_sphere(32, 32)
    def quad(ring: int, segment: int) -> list[int]:  # uv_sphere: per ring, 32 (a, c, d) then 32 (a, d, b)
        first = 32 + 64 * ring + segment
        return [first, first + 32]

    small = quad(2, 5)  # a 4-edge hole
    large = [i for s in range(20) for i in quad(8, s)]  # a strip of 20 quads: 42 edges
    holed = punch(f, small + large)
    corners = f[small].reshape(-1).unique()
    rim = edges_of(f[small], v.shape[0])
    rim_pairs = rim.pairs[rim.count == 1]
    perimeter_small = float((v[rim_pairs[:, 0]] - v[rim_pairs[:, 1]]).norm(dim=1).sum())
    assert boundary_sides(holed, v.shape[0]) == 4 + 42
    v2, f2 = fill_small_holes(v, holed, max_perimeter=0.5)
    assert perimeter_small < 0.5 < 5 * perimeter_small  # the strip's rim is about 10x longer
    assert v2.shape[0] == v.shape[0] + 1  # one centre vertex, for the small hole only
    assert f2.shape[0] == holed.shape[0] + 4
    assert boundary_sides(f2, v2.shape[0]) == 42
    assert directed_edges_agree(f2)
    assert torch.allclose(v2[-1], v[corners].mean(dim=0), atol=1e-6)  # midpoint mean = vertex mean on a quad


def test_open_sheet_boundary_is_not_a_small_hole() -> None:
    v, f = sheet(20)
    v2, f2 = fill_small_holes(v, f, max_perimeter=3e-2)
    assert torch.equal(f2, f) and torch.equal(v2, v)


def test_cut_closes_whatever_its_length_when_the_source_was_closed_there() -> None:
    """A strip of 20 quads missing from a sphere whose source surface is whole: the 42-edge loop (far above any
    small-hole limit) is triangulated over its own vertices, wound with its neighbours, area close to the strip's."""
    v, f = uv_sphere(32, 32)
    strip = [32 + 64 * 8 + s + half for s in range(20) for half in (0, 32)]
    holed = punch(f, strip)
    closed = close_cuts(v, holed, torch.arange(v.shape[0]), f)
    assert closed.shape[0] == holed.shape[0] + 40  # n - 2 triangles for a 42-edge loop, no new vertex
    counts = edges_of(closed, v.shape[0]).count
    assert bool((counts == 2).all()) and directed_edges_agree(closed)

    def area(faces: torch.Tensor) -> float:
        p = v.double()[faces.long()]
        return float(0.5 * torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]).norm(dim=1).sum())

    assert 0.9 * area(f[strip]) < area(closed[holed.shape[0]:]) <= area(f[strip]) * 1.001


def test_a_loop_on_the_source_border_stays_open() -> None:
    """An open sheet's border was a border in the source too: it is an opening, not a cut."""
    v, f = sheet(20)
    assert torch.equal(close_cuts(v, f, torch.arange(v.shape[0]), f), f)


def test_a_cut_is_never_closed_through_an_edge_the_mesh_already_has() -> None:
    """A rhombus whose bottom uses the short diagonal 0-2: the top must take the long one (1-3), or edge 0-2
    would carry three faces."""
    v = torch.tensor([[-0.5, 0, 0], [0, -2, 0], [0.5, 0, 0], [0, 2, 0]], dtype=torch.float64)
    bottom = torch.tensor([[0, 2, 1], [0, 3, 2]])
    source = torch.cat([bottom, torch.tensor([[0, 1, 2], [0, 2, 3]])])
    closed = close_cuts(v, bottom, torch.arange(4), source)
    top = {tuple(sorted(t)) for t in closed[2:].tolist()}
    assert top == {(0, 1, 3), (1, 2, 3)}
    assert bool((edges_of(closed, 4).count == 2).all()) and directed_edges_agree(closed)


def test_compact_drops_unreferenced_vertices_in_order() -> None:
    v = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    f = torch.tensor([[4, 1, 3]], dtype=torch.int32)
    v2, f2 = compact(v, f)
    assert v2.tolist() == [v[1].tolist(), v[3].tolist(), v[4].tolist()]
    assert f2.tolist() == [[2, 0, 1]]


def test_open_pieces_face_the_side_seen_from_outside() -> None:
    """A bowl (lower half of a sphere) faces its convex side out, from either winding; a lone flat sheet, seen
    equally from both sides, faces up."""
    v, f = uv_sphere(24, 32)
    centre = v[f.long()].mean(dim=1)
    bowl = compact(v, f[centre[:, 2] < 0])
    for faces in (bowl[1], bowl[1][:, [0, 2, 1]]):
        oriented = unify_orientation(bowl[0], faces)
        assert directed_edges_agree(oriented)
        p = bowl[0][oriented.long()]
        normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        assert bool(((normal * p.mean(dim=1)).sum(dim=1) > 0).all())  # away from the sphere's centre
    sv, sf = sheet(10, wave=0.0)
    for faces in (sf, sf[:, [0, 2, 1]]):
        oriented = unify_orientation(sv, faces)
        p = sv[oriented.long()]
        assert bool((torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])[:, 2] > 0).all())
