"""The DiT pieces shared by the dense sparse-structure flow and the sparse structured-latent flows.

Every block works on PACKED tokens: a [N, C] matrix holding the rows of B batch items back to back, plus a
`Packing` that says how many rows each item owns. The dense model packs B equal-length sequences, the
sparse model its voxels, so one block implementation serves both.

Attribute names reproduce the reference state-dict keys (shared/reference/manifests). The numerics copy
the reference (shared/reference/numerics.md §4): LayerNorms, q/k RMS norms, RoPE and the timestep embedding
run in float32 and cast back; the modulation `h * (1 + scale) + shift` runs in the torso dtype.

The elementwise work between the GEMMs and attention goes through `backend/native` ops (on CUDA, Triton kernels
that fuse the norm with the residual and modulation, the q/k norm with RoPE, and the GELU into its GEMM; on
CPU, exactly the reference's op sequence). `forward_tokens` replays a CUDA graph while a sampler runs inside
`captured_graphs` (backend/trellis2/cuda_graphs.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backend.native.fused_layer_norm import fused_layer_norm, layer_norm32
from backend.native.gated_residual import gated_residual
from backend.native.linear_gelu import linear_gelu
from backend.native.rms_norm_rope import rms_norm_rope, rms_norm_torch
from backend.trellis2.attention import attention
from backend.trellis2.cuda_graphs import FlowGraphs

DTYPES = {
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
}


def str_to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


class Packing:
    """Row layout of a packed batch: item i owns the next `seqlens[i]` rows."""

    def __init__(self, seqlens: list[int], device: torch.device):
        self.seqlens = seqlens
        # With one item, [1, C] broadcasts against [N, C]; only several items need a row -> item map.
        self.row_items = None
        if len(seqlens) > 1:
            counts = torch.tensor(seqlens, device=device)
            self.row_items = torch.repeat_interleave(
                torch.arange(len(seqlens), device=device), counts, output_size=sum(seqlens)
            )


# ----------------------------------------------------------------------------------------- timestep


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of t (already 1000 * flow time): cosines first, then sines."""
    half = dim // 2  # the table is made on t's device: a host-to-device copy could not be graph-captured
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


# ----------------------------------------------------------------------------------------- RoPE


def rope_frequencies(head_dim: int, axes: int = 3, rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """float32 [head_dim // 2 // axes]: the per-axis rotation frequencies (21 for head_dim 128)."""
    n = head_dim // 2 // axes
    return rope_freq[0] / (rope_freq[1] ** (torch.arange(n, dtype=torch.float32) / n))


def rope_phases(coords: torch.Tensor, head_dim: int, rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """complex64 [N, head_dim // 2]: e^(i * coord_axis * freq) per token, axis-major, padded with phase 0.

    coords: integer [N, axes] positions (x, y, z).
    """
    freqs = rope_frequencies(head_dim, coords.shape[1], rope_freq).to(coords.device)
    angles = (coords.reshape(-1, 1) * freqs).reshape(coords.shape[0], -1)
    angles = F.pad(angles, (0, head_dim // 2 - angles.shape[1]))  # angle 0 = identity rotation
    return torch.polar(torch.ones_like(angles), angles)


def grid_coords(resolution: int) -> torch.Tensor:
    """int64 [R^3, 3] voxel coords of a dense grid in x-major order (token index = (x*R + y)*R + z)."""
    axis = torch.arange(resolution)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------------------- norms


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (with float32 affine params), returned in the input dtype
    (`backend.native.fused_layer_norm.layer_norm32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm32(x, self.eps, self.weight, self.bias)


class MultiHeadRMSNorm(nn.Module):
    """Per-head L2 normalisation times a learned gain [H, D] times sqrt(D), in float32. The attention layers
    apply it through `rms_norm_rope` together with RoPE; this module holds the gain."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_torch(x, self.gamma)


# ----------------------------------------------------------------------------------------- layers


class SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool, dtype: torch.dtype):
        super().__init__()
        self.num_heads = num_heads
        self.qk_rms_norm = qk_rms_norm
        head_dim = channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels, dtype=dtype)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels, dtype=dtype)

    def forward(self, x: torch.Tensor, packing: Packing, phases: torch.Tensor) -> torch.Tensor:
        """x [N, C]; phases [N, D/2] complex RoPE phases of each row."""
        q, k, v = self.to_qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        q = rms_norm_rope(q, self.q_rms_norm.gamma if self.qk_rms_norm else None, phases)
        k = rms_norm_rope(k, self.k_rms_norm.gamma if self.qk_rms_norm else None, phases)
        h = attention(q, k, v, packing.seqlens)
        return self.to_out(h.reshape(x.shape))


class CrossAttention(nn.Module):
    def __init__(self, channels: int, ctx_channels: int, num_heads: int, qk_rms_norm: bool, dtype: torch.dtype):
        super().__init__()
        self.num_heads = num_heads
        self.qk_rms_norm = qk_rms_norm
        head_dim = channels // num_heads
        self.to_q = nn.Linear(channels, channels, dtype=dtype)
        self.to_kv = nn.Linear(ctx_channels, 2 * channels, dtype=dtype)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x [N, C] packed rows; context [B, L, Cc]: item i's rows attend to context[i] only."""
        batch, ctx_len, _ = context.shape
        q = self.to_q(x).view(x.shape[0], self.num_heads, -1)
        k, v = self.to_kv(context).view(batch * ctx_len, 2, self.num_heads, -1).unbind(1)
        if self.qk_rms_norm:
            q = rms_norm_rope(q, self.q_rms_norm.gamma, None)
            k = rms_norm_rope(k, self.k_rms_norm.gamma, None)
        h = attention(q, k, v, packing.seqlens, [ctx_len] * batch)
        return self.to_out(h.reshape(x.shape))


class FeedForward(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float, dtype: torch.dtype):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, dtype=dtype),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _gelu, down = self.mlp
        return down(linear_gelu(x, up.weight, up.bias))


class ModulatedCrossBlock(nn.Module):
    """x + gate·SelfAttn(mod(LN1 x)) -> x + CrossAttn(LN2 x, cond) -> x + gate·MLP(mod(LN3 x)).

    The six modulation vectors (shift, scale, gate for attention, then for the MLP) come from the timestep:
    with share_mod, the model's global adaLN output plus this block's learned `modulation` offset; without,
    this block's own adaLN layer.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float,
        share_mod: bool,
        qk_rms_norm: bool,
        qk_rms_norm_cross: bool,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(channels, num_heads, qk_rms_norm, dtype)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm_cross, dtype)
        self.mlp = FeedForward(channels, mlp_ratio, dtype)
        if share_mod:
            self.modulation = nn.Parameter(torch.randn(6 * channels) / channels**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, dtype=dtype))

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor, packing: Packing, phases: torch.Tensor
    ) -> torch.Tensor:
        """x [N, C] packed rows; mod [B, 6C] per item; context [B, L, Cc]; phases [N, D/2] complex."""
        # The float32 offset + torso-dtype mod sums in float32, then is cast, as in the reference.
        mod = (self.modulation + mod).type(mod.dtype) if self.share_mod else self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        items = packing.row_items

        _, h = fused_layer_norm(x, self.norm1.eps, modulation=(scale_msa, shift_msa), row_items=items)
        x, h = fused_layer_norm(x, self.norm2.eps, self.norm2.weight, self.norm2.bias,
                                residual=self.self_attn(h, packing, phases), gate=gate_msa, row_items=items)
        x, h = fused_layer_norm(x, self.norm3.eps, residual=self.cross_attn(h, context, packing),
                                modulation=(scale_mlp, shift_mlp), row_items=items)
        return gated_residual(x, self.mlp(h), gate_mlp, items)


class FlowTransformer(nn.Module):
    """The body shared by both flow models: timestep conditioning, input projection, the block stack and
    the output head, on packed tokens. Subclasses only turn their inputs into packed rows and RoPE phases.

    With a half dtype only the Linear layers inside `blocks` use it; everything else stays float32.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        pe_mode: str = "ape",
        rope_freq: tuple[float, float] = (1.0, 10000.0),
        dtype: str | torch.dtype = "float32",
        use_checkpoint: bool = False,
        share_mod: bool = False,
        initialization: str = "vanilla",
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        """The reference constructor's arguments (a checkpoint JSON's `args`). Without effect at inference:
        `use_checkpoint` (gradient checkpointing) and `initialization` (weights come from the checkpoint).
        Only pe_mode 'rope' (the 4B setting) is implemented; the reference default 'ape' raises, so a JSON that
        leaves pe_mode out fails loudly instead of silently getting RoPE."""
        if pe_mode != "rope":
            raise NotImplementedError(f"pe_mode {pe_mode!r}: only 'rope' (the TRELLIS.2-4B setting) is implemented")
        super().__init__()
        self.resolution = resolution
        self.rope_freq = tuple(rope_freq)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_heads = num_heads or model_channels // num_head_channels
        self.head_dim = model_channels // self.num_heads
        self.share_mod = share_mod
        self.dtype = str_to_dtype(dtype)

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            ModulatedCrossBlock(
                model_channels, cond_channels, self.num_heads, mlp_ratio, share_mod,
                qk_rms_norm, qk_rms_norm_cross, self.dtype,
            )
            for _ in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, out_channels)
        self.graphs: FlowGraphs | None = None  # set while a sampler runs inside `captured_graphs(self)`

    def forward_tokens(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, packing: Packing, phases: torch.Tensor
    ) -> torch.Tensor:
        """x [N, Cin] packed rows; t [B] (1000 * flow time); cond [B, L, Cc]; phases [N, D/2] -> [N, Cout]."""
        if cond.shape[0] != len(packing.seqlens):
            raise ValueError(f"cond has {cond.shape[0]} items but the tokens have {len(packing.seqlens)}")
        if self.graphs is not None:
            return self.graphs.run(self._forward_tokens, (x, t, cond, phases), packing, tuple(packing.seqlens))
        return self._forward_tokens(x, t, cond, phases, packing)

    def _forward_tokens(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, phases: torch.Tensor, packing: Packing
    ) -> torch.Tensor:
        h = self.input_layer(x).type(self.dtype)
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb = t_emb.type(self.dtype)
        cond = cond.type(self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond, packing, phases)
        h = F.layer_norm(h.type(x.dtype), h.shape[-1:])  # no affine, PyTorch's default eps 1e-5
        return self.out_layer(h)
