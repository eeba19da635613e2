"""Decoders and mesh extraction: golden cases, 4B state-dict layout, guided subdivision, fp16 storage, meshes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from backend.ovoxel.dual_grid import flexible_dual_grid_to_mesh
from backend.trellis2.sc_vae import FlexiDualGridVaeDecoder, SparseUnetVaeDecoder, subdivide
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.ss_decoder import SparseStructureDecoder, pixel_shuffle_3d

GOLDEN_CASES = ["sparse_conv3d_a", "ss_decoder_a", "sc_vae_decoders_a", "fdg_mesh_a"]
DECODER_CLASSES = {
    "SparseStructureDecoder": SparseStructureDecoder,
    "SparseUnetVaeDecoder": SparseUnetVaeDecoder,
    "FlexiDualGridVaeDecoder": FlexiDualGridVaeDecoder,
}
TINY = dict(
    model_channels=[16, 16, 8],
    latent_channels=4,
    num_blocks=[1, 1, 0],
    block_type=["SparseConvNeXtBlock3d"] * 3,
    up_block_type=["SparseResBlockC2S3d"] * 2,
    block_args=[{"use_checkpoint": False}] * 3,
)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_case(name: str, golden_failures) -> None:
    checks, failed = golden_failures(name)
    assert checks and not failed, failed


@pytest.mark.parametrize("name", ["sparse_structure_decoder", "shape_slat_decoder", "tex_slat_decoder"])
def test_state_dict_matches_4b_manifest(name: str, load_manifest) -> None:
    manifest = load_manifest(name)
    with torch.device("meta"):
        model = DECODER_CLASSES[manifest["class_name"]](**manifest["args"])
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch."), "param"] for k, v in model.state_dict().items()]
    assert ours == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]


def tiny_latent(seed: int) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b, n in enumerate([20, 12]):
        cells = torch.randperm(64, generator=g)[:n]
        parts.append(torch.stack([torch.full_like(cells, b), cells // 16, cells // 4 % 4, cells % 4], dim=1))
    coords = torch.cat(parts).int()
    return SparseTensor(torch.randn(coords.shape[0], 4, generator=g), coords)


def tiny_decoders(seed: int) -> tuple[FlexiDualGridVaeDecoder, SparseUnetVaeDecoder]:
    torch.manual_seed(seed)
    shape = FlexiDualGridVaeDecoder(resolution=16, **TINY).eval()
    tex = SparseUnetVaeDecoder(out_channels=6, pred_subdiv=False, **TINY).eval()
    return shape, tex


@torch.no_grad()
def test_texture_decoder_follows_guide_subs() -> None:
    shape_dec, tex_dec = tiny_decoders(0)
    x = tiny_latent(1)
    shape = shape_dec(x)
    assert torch.equal(shape.subs[0].coords, x.coords)
    assert torch.equal(shape.subs[1].coords, subdivide(x.coords, shape.subs[0].feats > 0)[1])
    tex_latent = x.replace(torch.randn(x.feats.shape, generator=torch.Generator().manual_seed(2)))
    tex = tex_dec(tex_latent, guide_subs=shape.subs)
    assert torch.equal(tex.coords, shape.raw.coords) and tex.feats.shape == (shape.raw.coords.shape[0], 6)

    # Another guide at the last level gives exactly the subdivision it encodes.
    last = shape.subs[-1]
    flipped = last.replace(-last.feats)
    tex_flipped = tex_dec(tex_latent, guide_subs=[shape.subs[0], flipped])
    assert torch.equal(tex_flipped.coords, subdivide(last.coords, last.feats < 0)[1])

    with pytest.raises(ValueError):  # a guide for other voxels is refused rather than silently misapplied
        tex_dec(tex_latent, guide_subs=[shape.subs[1], shape.subs[1]])
    with pytest.raises(ValueError):
        tex_dec(tex_latent)


@torch.no_grad()
def test_subdivision_child_order() -> None:
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[0, [1, 6]] = True
    keep[1, 7] = True
    slot, child = subdivide(coords, keep)
    assert slot.tolist() == [1, 6, 15]
    assert child.tolist() == [[0, 3, 4, 6], [0, 2, 5, 7], [1, 1, 1, 1]]  # bit 0 -> x, bit 1 -> y, bit 2 -> z


@torch.no_grad()
def test_upsample_path_returns_the_decoders_voxels() -> None:
    shape_dec, _ = tiny_decoders(3)
    x = tiny_latent(4)
    shape = shape_dec(x)
    assert torch.equal(shape_dec.upsample(x), shape.raw.coords)
    assert torch.equal(shape_dec.upsample(x, 1), shape.subs[1].coords)
    assert torch.equal(shape_dec.upsample(x, 0), x.coords)


@torch.no_grad()
def test_shape_decoder_meshes_per_batch_item() -> None:
    shape_dec, _ = tiny_decoders(5)
    shape = shape_dec(tiny_latent(6))
    assert len(shape.meshes) == 2
    for rows, (vertices, faces) in zip(shape.raw.batch_slices(), shape.meshes):
        assert vertices.shape == (rows.stop - rows.start, 3) and faces.dtype == torch.int32
        assert faces.numel() == 0 or int(faces.max()) < vertices.shape[0]
    assert bool(((shape.vertices.feats > -0.5) & (shape.vertices.feats < 1.5)).all())


@torch.no_grad()
def test_fp16_storage_computes_in_fp32_on_cpu() -> None:
    """On CPU an fp16 torso must give exactly what an fp32 model holding the same (fp16-rounded) values gives."""
    shape_fp16 = FlexiDualGridVaeDecoder(resolution=16, use_fp16=True, **TINY).eval()
    shape_fp32 = FlexiDualGridVaeDecoder(resolution=16, **TINY).eval()
    shape_fp32.load_state_dict({k: v.float() for k, v in shape_fp16.state_dict().items()})
    assert shape_fp16.blocks[0][0].conv.weight.dtype == torch.float16
    assert shape_fp16.blocks[0][0].norm.weight.dtype == torch.float32
    assert shape_fp16.from_latent.weight.dtype == torch.float32
    x = tiny_latent(7)
    assert torch.equal(shape_fp16(x).raw.feats, shape_fp32(x).raw.feats)

    ss_args = dict(out_channels=1, latent_channels=4, num_res_blocks=1, channels=[16, 8], num_res_blocks_middle=1)
    ss_fp16 = SparseStructureDecoder(use_fp16=True, **ss_args).eval()
    ss_fp32 = SparseStructureDecoder(**ss_args).eval()
    ss_fp32.load_state_dict({k: v.float() for k, v in ss_fp16.state_dict().items()})
    assert ss_fp16.blocks[0].conv1.weight.dtype == torch.float16 and ss_fp16.blocks[0].norm1.weight.dtype == torch.float32
    z = torch.randn(1, 4, 3, 3, 3)
    logits = ss_fp16(z)
    assert logits.shape == (1, 1, 6, 6, 6) and torch.equal(logits, ss_fp32(z))


def test_pixel_shuffle_puts_x_most_significant() -> None:
    x = torch.zeros(1, 16, 1, 1, 1)
    x[0, 8:, 0, 0, 0] = torch.arange(8.0)  # output channel 1, sub-position index 4i + 2j + k
    out = pixel_shuffle_3d(x)
    for i, j, k in torch.cartesian_prod(*[torch.arange(2)] * 3).tolist():
        assert out[0, 1, i, j, k] == 4 * i + 2 * j + k
    assert not out[0, 0].any()


def box_shell(grid: int, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels and edge flags of the dual grid of a box whose inside corner points are [low, high]^3."""
    cells = torch.cartesian_prod(*[torch.arange(grid)] * 3)

    def inside(points: torch.Tensor) -> torch.Tensor:
        return ((points >= low) & (points <= high)).all(dim=-1)

    corners = cells[:, None] + torch.cartesian_prod(*[torch.arange(2)] * 3)
    crossing = inside(corners).any(1) & ~inside(corners).all(1)
    flags = []
    for axis in range(3):
        start = cells + 1
        start[:, axis] -= 1  # the edge along `axis` at the cell's upper corner in the other two axes
        end = start.clone()
        end[:, axis] += 1
        flags.append(inside(start) != inside(end))
    return cells[crossing], torch.stack(flags, dim=1)[crossing]


def test_box_shell_gives_a_closed_mesh() -> None:
    coords, flags = box_shell(grid=8, low=2, high=5)
    dual = torch.full((coords.shape[0], 3), 0.5)
    weights = torch.rand(coords.shape[0], 1, generator=torch.Generator().manual_seed(0)) + 0.1
    for split_weight in (weights, None):
        vertices, faces = flexible_dual_grid_to_mesh(coords, dual, flags, split_weight, [[-0.5] * 3, [0.5] * 3], 8)
        assert torch.allclose(vertices, (coords + 0.5) / 8 - 0.5)
        assert faces.shape == (2 * 6 * 4 * 4, 3)  # 4x4 crossing edges per box face, two triangles each
        edges = Counter(tuple(sorted(e)) for f in faces.tolist() for e in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])))
        assert set(edges.values()) == {2}  # closed and manifold: every edge borders exactly two triangles
        used = {v for f in faces.tolist() for v in f}
        assert len(used) - len(edges) + faces.shape[0] == 2  # Euler characteristic of a sphere


def test_quad_split_and_missing_corner() -> None:
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0], [5, 5, 5]])
    flags = torch.zeros(5, 3, dtype=torch.bool)
    flags[0, 0] = True  # x-edge quad over voxels 0, 1, 2, 3
    flags[4, 1] = True  # y-edge quad with missing corners: dropped
    dual = torch.full((5, 3), 0.5)
    aabb = [[-0.5] * 3, [0.5] * 3]
    diagonal_02 = torch.tensor([[2.0], [1.0], [2.0], [1.0], [1.0]])
    _, faces = flexible_dual_grid_to_mesh(coords, dual, flags, diagonal_02, aabb, 8)
    assert faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    _, faces = flexible_dual_grid_to_mesh(coords, dual, flags, 3 - diagonal_02, aabb, 8)
    assert faces.tolist() == [[0, 1, 3], [3, 1, 2]]


def on_cuda(x: SparseTensor) -> SparseTensor:
    return SparseTensor(x.feats.cuda(), x.coords.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_fp16_decoders_follow_cpu() -> None:
    shape_dec, tex_dec = tiny_decoders(8)
    x = tiny_latent(9)
    cpu = shape_dec(x)
    gpu = shape_dec.cuda()(on_cuda(x))
    assert torch.equal(gpu.raw.coords.cpu(), cpu.raw.coords)
    torch.testing.assert_close(gpu.raw.feats.cpu(), cpu.raw.feats, atol=1e-4, rtol=1e-4)
    for (v_gpu, f_gpu), (v_cpu, f_cpu) in zip(gpu.meshes, cpu.meshes):
        assert torch.equal(f_gpu.cpu(), f_cpu)
    half = FlexiDualGridVaeDecoder(resolution=16, use_fp16=True, **TINY).eval()
    half.load_state_dict(shape_dec.state_dict())
    half_out = half.cuda()(on_cuda(x))
    assert half.blocks[0][0].conv.weight.dtype == torch.float16 and half_out.raw.feats.dtype == torch.float32
    tex = tex_dec.cuda()(on_cuda(x), guide_subs=half_out.subs)
    assert torch.equal(tex.coords, half_out.raw.coords)


@torch.no_grad()
def test_row_blocks_do_not_change_the_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoders bound their memory by working over blocks of rows; the result must not depend on it."""
    import backend.trellis2.sc_vae as sc_vae

    shape_dec, tex_dec = tiny_decoders(10)
    x = tiny_latent(11)
    whole_shape = shape_dec(x)
    whole_tex = tex_dec(x, guide_subs=whole_shape.subs)
    monkeypatch.setattr(sc_vae, "CHUNK_ELEMENTS", 100)  # a few rows per block, the last one partial
    assert len(sc_vae.row_blocks(37, 16)) == 7
    blocked_shape = shape_dec(x)
    blocked_tex = tex_dec(x, guide_subs=blocked_shape.subs)
    assert torch.equal(blocked_shape.raw.coords, whole_shape.raw.coords)
    # float32 GEMMs over fewer rows may sum in another order: rounding-level differences only
    torch.testing.assert_close(blocked_shape.raw.feats, whole_shape.raw.feats, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(blocked_tex.feats, whole_tex.feats, atol=2e-5, rtol=2e-5)
    assert torch.equal(shape_dec.upsample(x), blocked_shape.raw.coords)


@torch.no_grad()
def test_up_block_streams_its_last_conv_to_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """An up-block with nothing after it streams conv2 over blocks of rows with their own neighbour rows."""
    import backend.trellis2.sc_vae as sc_vae

    torch.manual_seed(12)
    block = sc_vae.SparseResBlockC2S3d(16, 8).eval()
    x = tiny_latent(13)
    x = x.replace(torch.randn(x.feats.shape[0], 16))
    kept, kept_logits = block(x, keep_neighbours=True)
    monkeypatch.setattr(sc_vae, "CHUNK_ELEMENTS", 32 * 5)  # blocks of 5 rows
    streamed, logits = block(SparseTensor(x.feats, x.coords), keep_neighbours=False)
    assert torch.equal(streamed.coords, kept.coords) and torch.equal(logits.feats, kept_logits.feats)
    assert sc_vae.NEIGHBOUR_MAP_KEY in kept.cache and sc_vae.NEIGHBOUR_MAP_KEY not in streamed.cache
    torch.testing.assert_close(streamed.feats, kept.feats, atol=1e-6, rtol=1e-6)
