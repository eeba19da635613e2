"""Quadric-error simplification by parallel edge collapses (Garland-Heckbert quadrics, CuMesh-style passes).

Each pass scores every edge, takes the cheapest ones still needed as candidates, checks every candidate on its
own (link condition, valence, normal flips, slivers), and then applies a set of the accepted ones whose
one-rings share no face, cheapest first. Because those rings are face-disjoint, a face moves at most one
corner per pass and no collapse changes another's neighbourhood, so checks made one collapse at a time stay
exact for the whole set; and a refused collapse never blocks its neighbours, so the passes cannot crawl.

Nothing is pinned. Open borders and sharp features are kept by cost: every vertex carries the area-weighted
planes of its faces (a crease keeps the planes of both sides), plus, on a border, planes through each border
edge perpendicular to its face. A vertex moves to the point its merged quadric likes best (regularised
towards the edge so flat regions stay well posed), which keeps creases and borders where they were. The only
topological refusals are those that would break the manifold: two border vertices pinched by an interior
edge, collapses failing the link condition, or a neighbour left with too few edges.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.asset.meshutil import boundary_sides, compact, edges_of, face_normals, unit_face_normals
from backend.ovoxel.segments import INT64_MAX, expand_segments

QUALITY_FLOOR = 0.15  # a collapse may not leave its ring's worst face below this and worse than before
MIN_NORMAL_COS = 0.3  # a collapse may not turn a face's normal by more than ~72 degrees
REGULARISATION = 1e-3  # pull of each collapse towards its edge's midpoint, relative to the mean face area
SLIVER_DISCOUNT = 0.01  # cost factor of the edges of faces below QUALITY_FLOOR
SKINNY_WEIGHT = 1e-2  # cost of the triangles a collapse leaves skinny (CuMesh: 1e-3), x mean area x |e|^2


def plane_quadrics(normal: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M, 10] weighted quadrics of planes n.x + d = 0 (unit n): upper triangle of w (n, d)(n, d)^T."""
    h = torch.cat([normal, offset.unsqueeze(1)], dim=1)
    i, j = torch.triu_indices(4, 4, device=normal.device)
    return weight.unsqueeze(1) * h[:, i] * h[:, j]


def point_quadrics(point: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M, 10] quadrics of w |x - point|^2."""
    zero = torch.zeros_like(weight)
    x, y, z = point.unbind(1)
    return weight.unsqueeze(1) * torch.stack(
        [zero + 1, zero, zero, -x, zero + 1, zero, -y, zero + 1, -z, x * x + y * y + z * z], dim=1)


def quadric_error(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    x, y, z = p.unbind(1)
    return (q[:, 0] * x * x + q[:, 4] * y * y + q[:, 7] * z * z + q[:, 9]
            + 2 * (q[:, 1] * x * y + q[:, 2] * x * z + q[:, 5] * y * z + q[:, 3] * x + q[:, 6] * y + q[:, 8] * z))


def quadric_minimiser(q: torch.Tensor) -> torch.Tensor:
    """Point minimising each (positive definite) quadric."""
    a = torch.stack([q[:, [0, 1, 2]], q[:, [1, 4, 5]], q[:, [2, 5, 7]]], dim=1)
    return torch.linalg.solve(a, -q[:, [3, 6, 8]])


def segment_minimiser(q: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Point of segment pa-pb minimising each quadric (the error is a parabola along it)."""
    e0, e1, em = quadric_error(q, pa), quadric_error(q, pb), quadric_error(q, 0.5 * (pa + pb))
    curvature = 2 * (e0 + e1 - 2 * em)  # E(t) = A t^2 + B t + C has e0 + e1 - 2 em = A / 2
    slope = e1 - e0
    t = torch.where(curvature > 1e-300, 0.5 - slope / (2 * curvature.clamp_min(1e-300)), (slope < 0).double())
    t = t.clamp(0, 1).unsqueeze(1)
    return pa + t * (pb - pa)


def triangle_quality(p: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """4 sqrt(3) area / sum of squared edge lengths of triangles p [M, 3, 3] with unnormalised normals [M, 3]:
    1 for equilateral, 0 for degenerate."""
    sq = ((p - p.roll(1, dims=1)) ** 2).sum(dim=(1, 2))
    return 2 * 3**0.5 * normals.norm(dim=1) / sq.clamp_min(1e-300)


def _initial_quadrics(pos: torch.Tensor, f: torch.Tensor, boundary_weight: float) -> torch.Tensor:
    """Area-weighted face planes per corner, plus a plane through each boundary edge perpendicular to its face."""
    unit, area = unit_face_normals(pos, f)
    q_face = plane_quadrics(unit, -(unit * pos[f[:, 0]]).sum(dim=1), area)
    q = torch.zeros(pos.shape[0], 10, dtype=pos.dtype, device=pos.device)
    for k in range(3):
        q.index_add_(0, f[:, k], q_face)
    side, a, b = boundary_sides(f, pos.shape[0])
    if side.numel():
        e = pos[b] - pos[a]
        m = torch.linalg.cross(e, unit[side // 3])
        m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-300)
        q_edge = plane_quadrics(m, -(m * pos[a]).sum(dim=1), boundary_weight * (e * e).sum(dim=1))
        q.index_add_(0, a, q_edge).index_add_(0, b, q_edge)
    return q


def _csr(index: torch.Tensor, values: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [size + 1], values grouped by index)."""
    order = torch.argsort(index, stable=True)
    offsets = torch.zeros(size + 1, dtype=torch.long, device=index.device)
    offsets[1:] = torch.cumsum(torch.bincount(index, minlength=size), 0)
    return offsets, values[order]


def _gather(offsets: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, value): every value listed under each of `rows`, with the position in `rows` it came from."""
    start = offsets[rows]
    owner, local = expand_segments(offsets[rows + 1] - start)
    return owner, values[start[owner] + local]


def _link_condition(x: torch.Tensor, y: torch.Tensor, required: torch.Tensor, edge_keys: torch.Tensor,
                    neighbours: tuple[torch.Tensor, torch.Tensor], num_vertices: int) -> torch.Tensor:
    """True where x and y share exactly `required` neighbours (the apexes of the faces on edge x-y).

    More common neighbours means the collapse would fuse two edges into one and pinch the surface.
    """
    owner, c = _gather(*neighbours, x)
    yy = y[owner]
    key = torch.minimum(c, yy) * num_vertices + torch.maximum(c, yy)
    pos = torch.searchsorted(edge_keys, key).clamp_max(edge_keys.numel() - 1)
    hit = (edge_keys[pos] == key) & (c != yy)
    common = torch.zeros(x.numel(), dtype=torch.long, device=x.device).index_add_(0, owner, hit.long())
    return common == required


def _disjoint_collapses(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor,
                        eligible: torch.Tensor, nv: int, rounds: int = 6) -> torch.Tensor:
    """Edges (ids) whose one-rings (faces on either endpoint) are pairwise face-disjoint, cheapest first.

    Each round takes the eligible edges that are the cheapest among all eligible edges touching any face of
    their ring (ties broken by id), so two picks cannot share a ring face; their rings are then claimed and
    edges touching claimed faces drop out before the next round. A few rounds approach a maximal set.
    """
    bits = cost.float().clamp_min(0).contiguous().view(torch.int32).long()
    ids = torch.arange(a.numel(), device=a.device)
    picked = []
    free = eligible.clone()
    for _ in range(rounds):
        key = torch.where(free, (bits << 32) | ids, INT64_MAX)
        vmin = torch.full((nv,), INT64_MAX, dtype=torch.long, device=f.device)
        vmin.scatter_reduce_(0, a, key, "amin").scatter_reduce_(0, b, key, "amin")
        fmin = vmin[f].amin(dim=1)
        vmin2 = torch.full((nv,), INT64_MAX, dtype=torch.long, device=f.device)
        vmin2.scatter_reduce_(0, f.reshape(-1), fmin.repeat_interleave(3), "amin")
        new = free & (key == vmin2[a]) & (key == vmin2[b])
        if not bool(new.any()):
            break
        picked.append(torch.nonzero(new).squeeze(1))
        touched = torch.zeros(nv, dtype=torch.bool, device=f.device)
        touched[a[new]] = True
        touched[b[new]] = True
        claimed = touched[f].any(dim=1)  # faces in the new rings
        blocked = torch.zeros(nv, dtype=torch.bool, device=f.device)
        blocked[f[claimed].reshape(-1)] = True  # any edge at these vertices touches a claimed face
        free &= ~blocked[a] & ~blocked[b]
    return torch.cat(picked) if picked else ids[:0]


def _ring_checks(pos: torch.Tensor, f: torch.Tensor, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 vertex_faces: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ok, skinny) per candidate collapse x, y -> target, each on its own: no face of its ring turns by more
    than MIN_NORMAL_COS allows, and the ring's worst face does not end below QUALITY_FLOOR unless it was worse
    before; skinny = mean of 1 - quality over the ring's surviving faces."""
    n = x.numel()
    owner_x, face_x = _gather(*vertex_faces, x)
    owner_y, face_y = _gather(*vertex_faces, y)
    owner, face = torch.cat([owner_x, owner_y]), torch.cat([face_x, face_y])
    corners = f[face]
    old = pos[corners]
    n_old = torch.linalg.cross(old[:, 1] - old[:, 0], old[:, 2] - old[:, 0])
    q_old = triangle_quality(old, n_old)
    # The worst face of the ring before, the faces on the edge included: mending a sliver may leave a face
    # skinnier than it was, as long as the ring's worst face gets better.
    worst_old = torch.ones(n, dtype=pos.dtype, device=x.device).scatter_reduce_(0, owner, q_old, "amin")
    xs, ys = x[owner].unsqueeze(1), y[owner].unsqueeze(1)
    has_x, has_y = (corners == xs).any(dim=1), (corners == ys).any(dim=1)
    keep = ~(has_x & has_y)  # faces on the edge vanish (and appear in both lists)
    owner, corners, old, n_old = owner[keep], corners[keep], old[keep], n_old[keep]
    moved = (corners == xs[keep]) | (corners == ys[keep])
    new = torch.where(moved.unsqueeze(2), target[owner].unsqueeze(1), old)
    n_new = torch.linalg.cross(new[:, 1] - new[:, 0], new[:, 2] - new[:, 0])
    cos = (n_old * n_new).sum(dim=1) / (n_old.norm(dim=1) * n_new.norm(dim=1)).clamp_min(1e-300)
    q_new = triangle_quality(new, n_new)
    worst_new = torch.ones(n, dtype=pos.dtype, device=x.device).scatter_reduce_(0, owner, q_new, "amin")
    flipped = torch.zeros(n, dtype=torch.long, device=x.device).index_add_(0, owner, (cos < MIN_NORMAL_COS).long())
    refused = (flipped > 0) | ((worst_new < QUALITY_FLOOR) & (worst_new < worst_old))
    total = torch.zeros(n, dtype=pos.dtype, device=x.device).index_add_(0, owner, 1 - q_new)
    count = torch.bincount(owner, minlength=n).clamp_min(1)
    return ~refused, total / count


def simplify(vertices: torch.Tensor, faces: torch.Tensor, target_faces: int, *, length_weight: float = 1e-2,
             boundary_weight: float = 10.0, max_passes: int = 300,
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices, faces) simplified to at most `target_faces` faces (fewer only when nothing more may go).

    Expects a consistently wound 2-manifold (manifold.make_manifold); edges with more than two faces are left
    alone. Cost of collapsing an edge = quadric error at the new vertex + length_weight x mean face area x
    |e|^2 (orders flat regions by edge length, which keeps triangles even) + SKINNY_WEIGHT x mean face area x
    |e|^2 x how skinny the ring's faces end up. `progress(faces_removed, total)` after each pass.
    """
    pos = vertices.double()
    f = faces.long()
    nv = pos.shape[0]
    start_faces = f.shape[0]
    if start_faces <= target_faces:
        return vertices, faces
    q = _initial_quadrics(pos, f, boundary_weight)
    mean_area = float(0.5 * face_normals(pos, f).norm(dim=1).mean())
    length_scale = length_weight * mean_area
    reach = 1  # how many times the faces still to remove the candidate set covers
    for _ in range(max_passes):
        excess = f.shape[0] - target_faces
        if excess <= 0:
            break
        edges = edges_of(f, nv)
        pairs, count = edges.pairs, edges.count
        a, b = pairs[:, 0], pairs[:, 1]
        keys = a * nv + b
        degree = torch.bincount(pairs.reshape(-1), minlength=nv)
        on_border = torch.zeros(nv, dtype=torch.bool, device=f.device)
        on_border[pairs[count == 1].reshape(-1)] = True
        valid = (count <= 2) & ~(on_border[a] & on_border[b] & (count == 2))  # no pinch of two borders

        # Where each collapse puts the merged vertex: the regularised quadric's minimiser, or the best point
        # on the edge when that lies off it.
        pa, pb = pos[a], pos[b]
        edge_len = (pb - pa).norm(dim=1)
        qe = q[a] + q[b]
        reg = point_quadrics(0.5 * (pa + pb), torch.full_like(edge_len, REGULARISATION * mean_area))
        opt = quadric_minimiser(qe + reg)
        near = (opt - 0.5 * (pa + pb)).norm(dim=1) <= 0.75 * edge_len
        target = torch.where(near.unsqueeze(1), opt, segment_minimiser(qe, pa, pb))
        err = quadric_error(qe, target).clamp_min(0)
        base = err + length_scale * edge_len**2
        # Edges of slivers go first: collapsing one removes the sliver.
        sliver = triangle_quality(pos[f], face_normals(pos, f)) < QUALITY_FLOOR
        on_sliver = torch.zeros(a.numel(), dtype=torch.bool, device=f.device)
        on_sliver[edges.of_side[sliver].reshape(-1)] = True
        base = torch.where(on_sliver, SLIVER_DISCOUNT * base, base)

        n_valid = int(valid.sum())
        if n_valid == 0:
            break
        k = min(n_valid, 2 * excess * reach)
        tau = base[valid].kthvalue(k).values
        candidate = torch.nonzero(valid & (base <= tau)).squeeze(1)

        # Every candidate checked on its own: link condition, valence of the apexes, flips and slivers.
        x, y = a[candidate], b[candidate]
        neighbours = (torch.cat([a, b]), torch.cat([b, a]))
        neighbours = _csr(neighbours[0], neighbours[1], nv)
        ok = _link_condition(x, y, count[candidate], keys, neighbours, nv)
        side_edge = edges.of_side.reshape(-1)
        sides = torch.nonzero(torch.isin(side_edge, candidate)).squeeze(1)
        apex = f.reshape(-1)[sides - sides % 3 + (sides % 3 + 2) % 3]
        thin = ~on_border[apex] & (degree[apex] <= 3)  # would be left on two edges: a fold
        slot = torch.searchsorted(candidate, side_edge[sides])
        ok &= torch.zeros(candidate.numel(), dtype=torch.long, device=f.device).index_add_(0, slot, thin.long()) == 0
        vertex_faces = _csr(f.reshape(-1), torch.arange(f.shape[0], device=f.device).repeat_interleave(3), nv)
        fine, skinny = _ring_checks(pos, f, x, y, target[candidate], vertex_faces)
        ok &= fine
        cost = base[candidate] + SKINNY_WEIGHT * mean_area * edge_len[candidate] ** 2 * skinny

        eligible = torch.zeros(a.numel(), dtype=torch.bool, device=f.device)
        eligible[candidate[ok]] = True
        full_cost = torch.full_like(base, float("inf"))
        full_cost[candidate] = cost
        chosen = _disjoint_collapses(f, a, b, full_cost, eligible, nv)
        chosen = chosen[torch.argsort(full_cost[chosen])]
        chosen = chosen[torch.cumsum(count[chosen], 0) - count[chosen] < excess]
        if chosen.numel() == 0:
            if k == n_valid:
                break  # every admissible collapse was checked and refused
            reach *= 4
            continue
        x, y = a[chosen], b[chosen]
        remap = torch.arange(nv, device=f.device)
        remap[y] = x
        pos[x] = target[chosen]
        q.index_add_(0, x, q[y])
        f = remap[f]
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
        if excess - (f.shape[0] - target_faces) < 0.02 * excess:
            reach *= 2  # too few candidates survived: look further down the cost order
        if progress is not None:
            progress(start_faces - f.shape[0], start_faces - target_faces)
    out_vertices, out_faces = compact(pos.to(vertices.dtype), f)
    return out_vertices, out_faces.to(faces.dtype)
