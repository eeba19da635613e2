"""Quadric-error simplification by parallel edge collapses (Garland-Heckbert quadrics, CuMesh-style passes).

Each pass scores every edge, picks a set of collapses whose one-rings share no face, checks them all at once
(link condition, normal flips, slivers) and applies the survivors together. Because the rings are
face-disjoint, every face moves at most one corner per pass, so the checks are exact although they run in
parallel. A cost threshold that only admits the cheapest edges still needed keeps the order close to the
classic greedy one. Boundary vertices never move (a boundary edge collapses onto one of its ends) and interior
edges never pinch two boundary vertices together, so open borders keep their shape; non-manifold vertices
are pinned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.asset.meshutil import boundary_sides, compact, edges_of, face_normals, unit_face_normals
from backend.ovoxel.segments import INT64_MAX, expand_segments

QUALITY_FLOOR = 0.1  # a collapse may not leave a face skinnier than this and than it was before
MIN_NORMAL_COS = 0.2  # a collapse may not turn a face's normal by more than ~78 degrees


def plane_quadrics(normal: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M, 10] weighted quadrics of planes n.x + d = 0 (unit n): upper triangle of w (n, d)(n, d)^T."""
    h = torch.cat([normal, offset.unsqueeze(1)], dim=1)
    i, j = torch.triu_indices(4, 4, device=normal.device)
    return weight.unsqueeze(1) * h[:, i] * h[:, j]


def quadric_error(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    x, y, z = p.unbind(1)
    return (q[:, 0] * x * x + q[:, 4] * y * y + q[:, 7] * z * z + q[:, 9]
            + 2 * (q[:, 1] * x * y + q[:, 2] * x * z + q[:, 5] * y * z + q[:, 3] * x + q[:, 6] * y + q[:, 8] * z))


def quadric_minimiser(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point minimising each quadric and whether its 3x3 system is well conditioned."""
    a = torch.stack([q[:, [0, 1, 2]], q[:, [1, 4, 5]], q[:, [2, 5, 7]]], dim=1)
    b = -q[:, [3, 6, 8]]
    det = torch.linalg.det(a)
    scale = a.diagonal(dim1=1, dim2=2).sum(dim=1)
    ok = det.abs() > 1e-6 * scale.abs().pow(3).clamp_min(1e-300)
    safe = torch.where(ok.reshape(-1, 1, 1), a, torch.eye(3, dtype=a.dtype, device=a.device).expand_as(a))
    return torch.linalg.solve(safe, b), ok


def triangle_quality(vertices: torch.Tensor, faces: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """4 sqrt(3) area / sum of squared edge lengths: 1 for equilateral, 0 for degenerate."""
    p = vertices[faces]
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


def _neighbour_table(pairs: torch.Tensor, num_vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR adjacency (offsets [V + 1], neighbours) from undirected edge pairs."""
    src = torch.cat([pairs[:, 0], pairs[:, 1]])
    dst = torch.cat([pairs[:, 1], pairs[:, 0]])
    order = torch.argsort(src)
    offsets = torch.zeros(num_vertices + 1, dtype=torch.long, device=pairs.device)
    offsets[1:] = torch.cumsum(torch.bincount(src, minlength=num_vertices), 0)
    return offsets, dst[order]


def _link_condition(x: torch.Tensor, y: torch.Tensor, required: torch.Tensor, edge_keys: torch.Tensor,
                    offsets: torch.Tensor, neighbours: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """True where x and y share exactly `required` neighbours (the apexes of the faces on edge x-y).

    More common neighbours means the collapse would fuse two edges into one and pinch the surface.
    """
    start, length = offsets[x], offsets[x + 1] - offsets[x]
    owner, local = expand_segments(length)
    c = neighbours[start[owner] + local]
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
    bits = cost.contiguous().view(torch.int32).long()
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


def simplify(vertices: torch.Tensor, faces: torch.Tensor, target_faces: int, *, length_weight: float = 1e-2,
             boundary_weight: float = 10.0, max_passes: int = 500,
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices, faces) simplified to at most `target_faces` faces (fewer only when nothing more may go).

    Expects a consistently wound mesh (see cleanup.unify_orientation). Cost of collapsing an edge = quadric
    error at the new vertex + length_weight x mean face area x |edge|^2 (the length term orders flat regions
    by edge length, which keeps triangles even). Interior edges move to the quadric minimiser when it is well
    posed and near the edge, else the best of the endpoints and the midpoint. `progress(faces_removed, total)`.
    """
    pos = vertices.double()
    f = faces.long()
    nv = pos.shape[0]
    start_faces = f.shape[0]
    if start_faces <= target_faces:
        return vertices, faces
    q = _initial_quadrics(pos, f, boundary_weight)
    length_scale = length_weight * float(0.5 * face_normals(pos, f).norm(dim=1).mean())
    blocked = torch.empty(0, dtype=torch.long, device=f.device)
    widen = 1
    stalled = False
    for _ in range(max_passes):
        excess = f.shape[0] - target_faces
        if excess <= 0:
            break
        edges = edges_of(f, nv)
        pairs, count = edges.pairs, edges.count
        a, b = pairs[:, 0], pairs[:, 1]
        keys = a * nv + b

        # Vertex roles: boundary vertices stay put; non-manifold and pinched-boundary vertices are pinned.
        boundary_degree = torch.bincount(pairs[count == 1].reshape(-1), minlength=nv)
        pinned = boundary_degree > 2
        pinned[pairs[count > 2].reshape(-1)] = True
        fixed = pinned | (boundary_degree > 0)
        fa, fb = fixed[a], fixed[b]
        along_boundary = (count == 1) & ~pinned[a] & ~pinned[b]
        valid = (count <= 2) & (~(fa & fb) | along_boundary)
        if blocked.numel():
            valid &= ~torch.isin(keys, blocked)

        # Where each collapse would put the surviving vertex, and what that costs.
        qe = q[a] + q[b]
        pa, pb = pos[a], pos[b]
        candidates = torch.stack([pa, pb, 0.5 * (pa + pb)], dim=1)
        errors = torch.stack([quadric_error(qe, candidates[:, k]) for k in range(3)], dim=1)
        errors[:, 2] = torch.where(along_boundary, torch.inf, errors[:, 2])  # boundary vertices stay put
        best_err, best_k = errors.min(dim=1)
        target = candidates[torch.arange(a.numel(), device=a.device), best_k]
        opt, ok = quadric_minimiser(qe)
        edge_len = (pb - pa).norm(dim=1)
        ok &= ((opt - 0.5 * (pa + pb)).norm(dim=1) <= edge_len) & ~along_boundary
        opt_err = quadric_error(qe, opt)
        use_opt = ok & (opt_err < best_err)
        target = torch.where(use_opt.unsqueeze(1), opt, target)
        err = torch.where(use_opt, opt_err, best_err)
        one_fixed = fa ^ fb
        target = torch.where((one_fixed & fa).unsqueeze(1), pa, target)
        target = torch.where((one_fixed & fb).unsqueeze(1), pb, target)
        err = torch.where(one_fixed, quadric_error(qe, target), err)
        cost = (err.clamp_min(0) + length_scale * edge_len**2).float()

        # Cheapest edges still needed (widened when passes stall), then face-disjoint local minima.
        n_valid = int(valid.sum())
        if n_valid == 0:
            break
        k = min(n_valid, max(1, (excess + 1) // 2) * widen)
        tau = cost[valid].kthvalue(k).values
        eligible = valid & (cost <= tau)
        chosen = _disjoint_collapses(f, a, b, cost, eligible, nv)
        chosen = chosen[torch.argsort(cost[chosen])]
        chosen = chosen[torch.cumsum(count[chosen], 0) - count[chosen] < excess]

        # Checks, all at once: link condition, then flips and slivers on the moved faces.
        x, y = a[chosen], b[chosen]
        offsets, neighbours = _neighbour_table(pairs, nv)
        accept = _link_condition(x, y, count[chosen], keys, offsets, neighbours, nv)
        owner = torch.full((nv,), -1, dtype=torch.long, device=f.device)
        owner[x] = torch.arange(chosen.numel(), device=f.device)
        owner[y] = owner[x]
        remap = torch.arange(nv, device=f.device)
        remap[y] = x
        new_pos = pos.clone()
        new_pos[x] = target[chosen]
        f_new = remap[f]
        face_owner = owner[f].amax(dim=1)
        gone = (f_new[:, 0] == f_new[:, 1]) | (f_new[:, 1] == f_new[:, 2]) | (f_new[:, 2] == f_new[:, 0])
        moved = torch.nonzero((face_owner >= 0) & ~gone).squeeze(1)
        n_old = face_normals(pos, f[moved])
        n_new = face_normals(new_pos, f_new[moved])
        cos = (n_old * n_new).sum(dim=1) / (n_old.norm(dim=1) * n_new.norm(dim=1)).clamp_min(1e-300)
        q_old = triangle_quality(pos, f[moved], n_old)
        q_new = triangle_quality(new_pos, f_new[moved], n_new)
        bad = (cos < MIN_NORMAL_COS) | ((q_new < QUALITY_FLOOR) & (q_new < q_old))
        accept[face_owner[moved[bad]]] = False

        done = chosen[accept]
        blocked = torch.cat([blocked, keys[chosen[~accept]]])
        if done.numel() == 0:
            if stalled and k == n_valid:
                break  # every admissible collapse has been tried and refused
            stalled = k == n_valid
            blocked = blocked[:0]
            widen *= 4
            continue
        x, y = a[done], b[done]
        remap = torch.arange(nv, device=f.device)
        remap[y] = x
        pos[x] = target[done]
        q.index_add_(0, x, q[y])
        f = remap[f]
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
        removed = excess - (f.shape[0] - target_faces)
        if removed < 0.01 * f.shape[0]:
            widen *= 2
        stalled = False
        if progress is not None:
            progress(start_faces - f.shape[0], start_faces - target_faces)
    out_vertices, out_faces = compact(pos.to(vertices.dtype), f)
    return out_vertices, out_faces.to(faces.dtype)
