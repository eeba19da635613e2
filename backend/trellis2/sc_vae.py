"""SC-VAE decoders (spec §2.5): sparse-conv U-Nets that grow a 32-channel latent on coarse voxels into fine voxels;
and the voxel-hierarchy ops they share with the encoder (`sc_vae_encoder.py`).

from_latent (fp32) -> stages of SparseConvNeXtBlock3d, each but the last ending in a SparseResBlockC2S3d that
splits every voxel into the children its subdivision logits select (x2 per axis) -> fp32 layer norm ->
output_layer. The shape decoder (`FlexiDualGridVaeDecoder`) predicts the subdivisions and turns its 7 output
channels into a mesh; the texture decoder (`SparseUnetVaeDecoder`, pred_subdiv=False) follows the shape
decoder's subdivisions so both end on the same voxels in the same row order.

A decoder run on an encoder's latent re-expands exactly the encoder's voxel hierarchy: the encoder's
spatial-to-channel steps record each level's `Subdivision` in the coarse voxel set's cache (the reference's
`channel2spatial_2` spatial cache), every tensor derived with `replace` keeps that cache, and an up-block whose
input carries one follows it instead of any logits (as the reference's SparseChannel2Spatial does).

With use_fp16, the Linear/conv parameters inside `blocks` are stored in fp16 and the torso computes in fp16
(fp32 on CPU, see `compute_dtype`); LayerNorms always compute in fp32.

Memory: the finest levels hold millions of voxels, so everything that widens the features (the ConvNeXt MLP's
4x hidden layer, the up-block's 8 x O conv output before the children are picked, the float32 head) runs over
blocks of rows of at most CHUNK_ELEMENTS values; row-wise work is unchanged by the blocking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backend.ovoxel.dual_grid import flexible_dual_grid_to_mesh
from backend.native import VoxelIndex, compute_dtype
from backend.native.fused_layer_norm import fused_layer_norm
from backend.native.sparse_conv import build_neighbour_map, neighbour_rows, submanifold_conv3d
from backend.trellis2.sparse import SparseTensor
from backend.trellis2.transformer import LayerNorm32

NEIGHBOUR_MAP_KEY = "submanifold_conv3d_3x3x3"
MESH_AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))
# Values in one block of widened rows: 2^25 is 64 MiB in fp16 (the GPU torso), 128 MiB in fp32.
CHUNK_ELEMENTS = 1 << 25


def row_blocks(rows: int, row_elements: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `rows` rows, each with at most CHUNK_ELEMENTS // row_elements rows."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


class Linear(nn.Linear):
    """nn.Linear whose parameters follow the activations' dtype (fp16 storage, fp32 compute on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def neighbour_map(x: SparseTensor) -> torch.Tensor:
    """The 3x3x3 neighbour map of x's voxels, built once per voxel set and kept in its cache."""
    if NEIGHBOUR_MAP_KEY not in x.cache:
        x.cache[NEIGHBOUR_MAP_KEY] = build_neighbour_map(x.coords)
    return x.cache[NEIGHBOUR_MAP_KEY]


class SparseConv3d(nn.Module):
    """Sub-manifold 3x3x3 conv; weight [Co, 3, 3, 3, Ci] as in the checkpoint (FlexGEMM layout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size != 3:
            raise ValueError(f"only 3x3x3 sub-manifold convs are used by TRELLIS.2, got kernel_size={kernel_size}")
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))
        bound = 1 / math.sqrt(27 * in_channels)  # nn.Conv3d's default init
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = submanifold_conv3d(x.feats, neighbour_map(x), self.weight.to(x.dtype), self.bias.to(x.dtype))
        return x.replace(out)


class SparseConvNeXtBlock3d(nn.Module):
    """x + MLP(LN(conv(x))); no norm before the conv. `use_checkpoint` (training only) is accepted and ignored."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, use_checkpoint: bool = False) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.norm = LayerNorm32(channels, eps=1e-6)
        self.conv = SparseConv3d(channels, channels)
        self.mlp = nn.Sequential(Linear(channels, hidden), nn.SiLU(), Linear(hidden, channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv(x).feats
        up, _silu, down = self.mlp
        for start, stop in row_blocks(h.shape[0], up.out_features):  # h's rows become the block's output rows
            _, normed = fused_layer_norm(h[start:stop], self.norm.eps, self.norm.weight, self.norm.bias)
            torch.add(down(F.silu(up(normed), inplace=True)), x.feats[start:stop], out=h[start:stop])
        return x.replace(h)


def subdivide(coords: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Children of the voxels `coords` [N, 4] selected by `keep` [N, 8] bool.

    Child k of a parent sits at 2*(x, y, z) + (k & 1, k >> 1 & 1, k >> 2 & 1) (bit 0 -> x). Children come
    parent-major, then by increasing k. Returns (slot [M] = parent * 8 + k, child coords int32 [M, 4]).
    """
    parent, k = keep.nonzero(as_tuple=True)
    child = coords[parent].clone()
    child[:, 1:] *= 2
    child[:, 1] += (k & 1).to(child.dtype)
    child[:, 2] += (k >> 1 & 1).to(child.dtype)
    child[:, 3] += (k >> 2 & 1).to(child.dtype)
    return parent * 8 + k, child


# Cache keys of the voxel hierarchy (the reference's spatial-cache names for factor 2).
CHANNEL_TO_SPATIAL = "channel2spatial_2"  # on a coarse voxel set: its Subdivision into the finer set
SPATIAL_TO_CHANNEL = "spatial2channel_2"  # on a fine voxel set: (coarse coords, coarse cache, Subdivision)


@dataclass(frozen=True)
class Subdivision:
    """How the voxels of a coarse set split into children at twice the resolution."""

    slot: torch.Tensor  # long [M]: parent row * 8 + child index k, k = x%2 + 2 (y%2) + 4 (z%2)
    coords: torch.Tensor  # int32 [M, 4] the children, in the fine set's row order
    cache: dict[str, Any]  # the fine voxel set's cache (shared by every tensor on those voxels)


def subdivision_of(x: SparseTensor, keep: torch.Tensor | None) -> Subdivision:
    """The subdivision an encoder recorded for x's voxels, else the children `keep` [N, 8] selects
    (parent-major, a new voxel set)."""
    recorded = x.cache.get(CHANNEL_TO_SPATIAL)
    if recorded is not None:
        return recorded
    if keep is None:
        raise ValueError("these voxels carry no encoder hierarchy: pass subdivision logits (guide_subs) to expand them")
    slot, coords = subdivide(x.coords, keep)
    return Subdivision(slot, coords, {})


def channel_to_spatial(x: SparseTensor, sub: Subdivision) -> SparseTensor:
    """The reference's SparseChannel2Spatial(2): child k of voxel i takes channels [k*C/8, (k+1)*C/8) of row i."""
    n, c = x.feats.shape
    return SparseTensor(x.feats.reshape(n * 8, c // 8)[sub.slot], sub.coords, sub.cache)


def spatial_to_channel(x: SparseTensor) -> SparseTensor:
    """The reference's SparseSpatial2Channel(2): each voxel becomes channel block k of its parent (2x coarser),
    absent children are zero. Parents are unique(fine // 2) ordered by the packed code
    ((b * M0 + x) * M1 + y) * M2 + z with M = ceil(spatial shape / 2), spatial shape = max coords + 1.

    The parents are computed once per fine voxel set (kept in its cache, so x and conv(x) share one coarse set),
    and the coarse set records its Subdivision for the decoder.
    """
    link = x.cache.get(SPATIAL_TO_CHANNEL)
    if link is None:
        coords = x.coords.long()
        shape = (coords[:, 1:].amax(dim=0) + 2) // 2 if coords.numel() else torch.ones(3, dtype=torch.long)
        parent = coords[:, 1:] // 2
        code = ((coords[:, 0] * shape[0] + parent[:, 0]) * shape[1] + parent[:, 1]) * shape[2] + parent[:, 2]
        code, row = torch.unique(code, return_inverse=True)
        coarse = torch.stack([code // (shape[0] * shape[1] * shape[2]), code // (shape[1] * shape[2]) % shape[0],
                              code // shape[2] % shape[1], code % shape[2]], dim=1).to(x.coords.dtype)
        child = (coords[:, 1] % 2) + 2 * (coords[:, 2] % 2) + 4 * (coords[:, 3] % 2)
        sub = Subdivision(row * 8 + child, x.coords, x.cache)
        link = (coarse, {CHANNEL_TO_SPATIAL: sub}, sub)
        x.cache[SPATIAL_TO_CHANNEL] = link
    coarse, coarse_cache, sub = link
    feats = x.feats.new_zeros(coarse.shape[0] * 8, x.feats.shape[1])
    feats[sub.slot] = x.feats
    return SparseTensor(feats.reshape(coarse.shape[0], -1), coarse, coarse_cache)


class SparseResBlockC2S3d(nn.Module):
    """Channel-to-space up-block C -> O: each voxel becomes up to 8 children at twice the resolution.

    The subdivision logits come from `to_subdiv` on the block input, or from a guide (texture decoder).
    Child k takes channels [k*O, (k+1)*O) of conv1's 8*O outputs; the skip takes channels [k*C/8, (k+1)*C/8)
    of the input, each repeated O/(C/8) times. `use_checkpoint` (training only) is accepted and ignored.
    """

    def __init__(
        self, channels: int, out_channels: int, pred_subdiv: bool = True, use_checkpoint: bool = False
    ) -> None:
        super().__init__()
        if channels % 8 or out_channels % (channels // 8):
            raise ValueError(f"C2S block needs C divisible by 8 and O by C/8, got C={channels}, O={out_channels}")
        self.out_channels = out_channels
        self.norm1 = LayerNorm32(channels, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, eps=1e-6, elementwise_affine=False)
        self.conv1 = SparseConv3d(channels, out_channels * 8)
        self.conv2 = SparseConv3d(out_channels, out_channels)
        if pred_subdiv:
            self.to_subdiv = Linear(channels, 8)

    def subdivision_logits(self, x: SparseTensor, guide: SparseTensor | None) -> SparseTensor | None:
        """[N, 8] logits on x's voxels: the guide's (after checking it describes the same voxels), else predicted;
        None when neither exists (only valid where x carries an encoder hierarchy to follow)."""
        if guide is not None:
            if not torch.equal(guide.coords, x.coords):
                raise ValueError("guide subdivision logits are on other voxels (or in another row order) than the input")
            return guide
        return x.replace(self.to_subdiv(x.feats)) if hasattr(self, "to_subdiv") else None

    def forward(
        self, x: SparseTensor, guide: SparseTensor | None = None, keep_neighbours: bool = True
    ) -> tuple[SparseTensor, SparseTensor | None]:
        """Returns (children features [M, O], the subdivision logits used [N, 8] on x's voxels, if any).

        An encoder hierarchy recorded on x's voxels decides the children whatever the logits say.
        keep_neighbours=False: nothing after this block convolves the children (the decoder's last level), so
        conv2 streams over blocks of output rows with their own neighbour rows instead of building, caching and
        holding the children's whole neighbour map (the largest single buffer of a decode).
        """
        logits = self.subdivision_logits(x, guide)
        sub = subdivision_of(x, None if logits is None else logits.feats > 0)
        slot, child_coords = sub.slot, sub.coords
        n, c = x.feats.shape
        o = self.out_channels
        _, act = fused_layer_norm(x.feats, self.norm1.eps, self.norm1.weight, self.norm1.bias, silu=True)
        weight, bias = self.conv1.weight.to(act.dtype), self.conv1.bias.to(act.dtype)
        neighbours = neighbour_map(x)
        # conv1 gives all 8 children's features of a parent (8 x O channels); compute it for a block of parents
        # at a time and keep only the children that exist. Children are visited in slot order (parent-major), so
        # each block's are a run; an encoder's hierarchy lists them in its own order, hence the sort.
        order = torch.argsort(slot)
        sorted_slot = slot[order]
        blocks = row_blocks(n, 8 * o)
        starts = torch.tensor([start for start, _ in blocks] + [n], device=slot.device)
        bounds = torch.searchsorted(sorted_slot, starts * 8).tolist()
        children = act.new_empty(slot.shape[0], o)
        for (start, stop), lo, hi in zip(blocks, bounds, bounds[1:]):
            parents = submanifold_conv3d(act, neighbours[start:stop], weight, bias)
            children[order[lo:hi]] = parents.view(-1, o)[sorted_slot[lo:hi] - start * 8]
        del act
        _, act = fused_layer_norm(children, self.norm2.eps, silu=True, out=children)  # in place
        h = SparseTensor(act, child_coords, sub.cache)
        weight, bias = self.conv2.weight.to(act.dtype), self.conv2.bias.to(act.dtype)
        if keep_neighbours:
            neighbours, index, blocks = neighbour_map(h), None, [(0, act.shape[0])]
        else:
            # ~1M rows a block: their neighbour rows, lookups and conv output stay around 300 MB
            neighbours, index, blocks = None, VoxelIndex(child_coords), row_blocks(act.shape[0], 32)
        # The skip is channel group k of the parent for child k, each value repeated O / (C / 8) times.
        skip = x.feats.reshape(n * 8, c // 8)
        out = act.new_empty(act.shape[0], o)
        for start, stop in blocks:
            rows = neighbours[start:stop] if index is None else neighbour_rows(index, child_coords[start:stop])
            block = submanifold_conv3d(act, rows, weight, bias)
            block.view(-1, c // 8, o // (c // 8)).add_(skip[slot[start:stop]].unsqueeze(2))
            out[start:stop] = block
        return h.replace(out), logits


def _with_guide_cache(x: SparseTensor, guide: SparseTensor) -> SparseTensor:
    """x sharing the guide's coordinate cache when both are on the same voxels: a texture decoder following the
    shape decoder's subdivisions then reuses its neighbour maps instead of building and holding its own."""
    if guide.coords.shape == x.coords.shape and torch.equal(guide.coords, x.coords):
        return SparseTensor(x.feats, x.coords, guide.cache)
    return x  # the up-block refuses a guide on other voxels, with a clear error


BLOCK_TYPES = {"SparseConvNeXtBlock3d": SparseConvNeXtBlock3d}
UP_BLOCK_TYPES = {"SparseResBlockC2S3d": SparseResBlockC2S3d}


def build_stages(model_channels: list[int], num_blocks: list[int], block_type: list[str], transition_type: list[str],
                 transitions: dict[str, type[nn.Module]], block_args: list[dict[str, Any]] | None,
                 dtype: torch.dtype, **transition_kwargs: Any) -> nn.ModuleList:
    """The U-Net torso: stage i is num_blocks[i] blocks on model_channels[i] channels, then (all but the last) a
    transition block to model_channels[i + 1] (up-blocks in decoders, down-blocks in encoders). The Linear and
    conv parameters are stored in `dtype` (the reference's convert_to_fp16 of `blocks`); norms stay float32."""
    stages = len(num_blocks)
    block_args = block_args if block_args is not None else [{} for _ in range(stages)]
    unknown = {*block_type} - BLOCK_TYPES.keys() | {*transition_type} - transitions.keys()
    if unknown:
        raise ValueError(f"unsupported block types {sorted(unknown)}")
    blocks = nn.ModuleList()
    for i in range(stages):
        stage = nn.ModuleList(
            BLOCK_TYPES[block_type[i]](model_channels[i], **block_args[i]) for _ in range(num_blocks[i])
        )
        if i < stages - 1:
            stage.append(transitions[transition_type[i]](model_channels[i], model_channels[i + 1],
                                                         **transition_kwargs, **block_args[i]))
        blocks.append(stage)
    for module in blocks.modules():
        if isinstance(module, (nn.Linear, SparseConv3d)):
            module.to(dtype)
    return blocks


class SparseUnetVaeDecoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str],
        up_block_type: list[str],
        block_args: list[dict[str, Any]] | None = None,
        use_fp16: bool = False,
        pred_subdiv: bool = True,
    ) -> None:
        super().__init__()
        self.pred_subdiv = pred_subdiv
        self.dtype = torch.float16 if use_fp16 else torch.float32
        # Registration order matches the reference state_dict order (output_layer first).
        self.output_layer = Linear(model_channels[-1], out_channels)
        self.from_latent = Linear(latent_channels, model_channels[0])
        self.blocks = build_stages(model_channels, num_blocks, block_type, up_block_type, UP_BLOCK_TYPES, block_args,
                                   self.dtype, pred_subdiv=pred_subdiv)

    @property
    def num_up_blocks(self) -> int:
        return len(self.blocks) - 1

    def _torso_input(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.from_latent(x.feats).to(compute_dtype(self.dtype, x.device)))

    def decode(
        self, x: SparseTensor, guide_subs: list[SparseTensor] | None = None
    ) -> tuple[SparseTensor, list[SparseTensor]]:
        """(output features on the finest voxels, the subdivision logits of every up-block on its input voxels;
        none for a decoder that follows an encoder's hierarchy without predicting).

        guide_subs: per up-block logits to follow instead of predicting (the shape decoder's, same row order).
        """
        if guide_subs is not None and len(guide_subs) != self.num_up_blocks:
            raise ValueError(f"guide_subs has {len(guide_subs)} entries, the decoder has {self.num_up_blocks} up-blocks")
        h = self._torso_input(x)
        subs: list[SparseTensor] = []
        for i, stage in enumerate(self.blocks):
            if guide_subs is not None and i < len(guide_subs):
                h = _with_guide_cache(h, guide_subs[i])
            for block in stage:
                if isinstance(block, SparseResBlockC2S3d):
                    streams = i == self.num_up_blocks - 1 and len(self.blocks[-1]) == 0  # no conv follows
                    h, logits = block(h, None if guide_subs is None else guide_subs[i], keep_neighbours=not streams)
                    if logits is not None:
                        subs.append(logits)
                else:
                    h = block(h)
        out = h.feats.new_empty(h.feats.shape[0], self.output_layer.out_features, dtype=x.dtype)
        for start, stop in row_blocks(h.feats.shape[0], h.feats.shape[1]):
            feats = F.layer_norm(h.feats[start:stop].to(x.dtype), h.feats.shape[-1:])
            out[start:stop] = self.output_layer(feats)
        # A fresh cache: the finest level's neighbour map is not needed by whoever keeps the output.
        return SparseTensor(out, h.coords), subs

    def forward(
        self, x: SparseTensor, guide_subs: list[SparseTensor] | None = None, return_subs: bool = False
    ) -> SparseTensor | tuple[SparseTensor, list[SparseTensor]]:
        out, subs = self.decode(x, guide_subs)
        return (out, subs) if return_subs else out

    def upsample(self, x: SparseTensor, upsample_times: int | None = None) -> torch.Tensor:
        """int32 [M, 4]: the voxels after `upsample_times` up-blocks (default all), without decoding features.

        The cascade uses this to grow a low-resolution structure. Only the subdivision decisions are needed,
        so the last up-block predicts its logits and subdivides without computing its features.
        """
        times = self.num_up_blocks if upsample_times is None else upsample_times
        if not 0 <= times <= self.num_up_blocks:
            raise ValueError(f"upsample_times must be in [0, {self.num_up_blocks}], got {times}")
        if times and not self.pred_subdiv:
            raise ValueError("upsampling needs a decoder that predicts its subdivisions (pred_subdiv=True)")
        h = self._torso_input(x)
        for i in range(times):
            *convnext_blocks, up = self.blocks[i]
            for block in convnext_blocks:
                h = block(h)
            if i == times - 1:
                return subdivision_of(h, up.subdivision_logits(h, None).feats > 0).coords
            h, _ = up(h)
        return h.coords


@dataclass
class ShapeDecoderOutput:
    raw: SparseTensor  # 7 channels per finest voxel, before the head
    subs: list[SparseTensor]  # subdivision logits of each up-block, on its input voxels (texture decoder guide)
    vertices: SparseTensor  # dual vertex per voxel, voxel units from its min corner, in (-m, 1+m)
    intersected: SparseTensor  # bool [N, 3] edge flags for x, y, z
    quad_lerp: SparseTensor  # [N, 1] quad split weights, > 0
    meshes: list[tuple[torch.Tensor, torch.Tensor]]  # per batch item: vertices float32 [V, 3], faces int32 [F, 3]


class FlexiDualGridVaeDecoder(SparseUnetVaeDecoder):
    """Shape decoder: a 7-channel SparseUnetVaeDecoder that predicts its subdivisions, plus the FDG mesh head."""

    def __init__(
        self,
        resolution: int,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str],
        up_block_type: list[str],
        block_args: list[dict[str, Any]] | None = None,
        voxel_margin: float = 0.5,
        use_fp16: bool = False,
    ) -> None:
        super().__init__(
            7, model_channels, latent_channels, num_blocks, block_type, up_block_type, block_args, use_fp16
        )
        self.resolution = resolution
        self.voxel_margin = voxel_margin

    def set_resolution(self, resolution: int) -> None:
        """The mesh grid size (finest voxel grid); the pipeline sets it before every decode."""
        self.resolution = resolution

    def forward(self, x: SparseTensor) -> ShapeDecoderOutput:  # type: ignore[override]
        raw, subs = self.decode(x)
        m = self.voxel_margin
        vertices = raw.replace((1 + 2 * m) * torch.sigmoid(raw.feats[:, 0:3]) - m)
        intersected = raw.replace(raw.feats[:, 3:6] > 0)
        quad_lerp = raw.replace(F.softplus(raw.feats[:, 6:7]))
        meshes = [
            flexible_dual_grid_to_mesh(
                raw.coords[rows, 1:],
                vertices.feats[rows],
                intersected.feats[rows],
                quad_lerp.feats[rows],
                aabb=MESH_AABB,
                grid_size=self.resolution,
            )
            for rows in raw.batch_slices()
        ]
        return ShapeDecoderOutput(raw, subs, vertices, intersected, quad_lerp, meshes)
