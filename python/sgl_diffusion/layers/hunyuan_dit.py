"""Blocks of the Hunyuan video DiT lineage, shared by HunyuanVideo (1.0) and HunyuanVideo-1.5.

Both checkpoints use the same token refiner over the prompt features (``context_embedder``), the same
dual-stream blocks (``transformer_blocks``: separate weights per stream, joint attention over
``[video, text]``, adaLN-zero modulation, RMS-normed q/k, 3D RoPE on the video tokens only), the same 3D patch
embedding and the same per-axis RoPE tables. Module attribute names mirror diffusers', so a model built from
these loads the checkpoints' keys as they are; operation order (and where values change dtype) follows the
reference for numerical parity.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import VideoAttention, attention
from .embeddings import TIME_PROJ_DIM, TimestepMLP, sinusoidal_embedding
from .fused import gated_residual, norm_modulate, qk_norm_rope
from .linear import GeluTanhFeedForward, ProjectionFusion
from .norms import RMSNorm
from .rotary import rope_tables_1d

__all__ = [
    "EPS",
    "AdaLNModulation",
    "HunyuanAttention",
    "HunyuanVideoRefinerBlock",
    "HunyuanVideoTokenRefiner",
    "HunyuanVideoTransformerBlock",
    "PatchEmbed3D",
    "RopeTables",
    "TimeTextEmbed",
    "gated_add",
    "modulated_layer_norm",
    "video_rope_tables",
]

#: Epsilon of every norm in the blocks (the reference's constant, not in config.json).
EPS = 1e-6

RopeTables = tuple[torch.Tensor, torch.Tensor]


def video_rope_tables(
    grid: tuple[int, int, int], axes_dims: tuple[int, ...], theta: float, device: torch.device
) -> RopeTables:
    """cos/sin ``(F * H * W, sum(axes_dims))`` for a latent token grid, tokens in (frame, row, column) order:
    each axis rotates its slice of a head by its own position, pairs interleaved.

    The reference builds the angles of every token in float32 on the latents' device; an angle depends only
    on its axis position, so each axis's table is built for its positions once and broadcast over the grid
    (the same float32 values)."""
    cos_parts, sin_parts = [], []
    for axis, (size, dim) in enumerate(zip(grid, axes_dims, strict=True)):
        positions = torch.arange(size, device=device, dtype=torch.float32)
        cos, sin = rope_tables_1d(dim, positions, theta, freqs_dtype=torch.float32)
        shape = [1, 1, 1, dim]
        shape[axis] = size
        cos_parts.append(cos.view(shape).expand(*grid, dim))
        sin_parts.append(sin.view(shape).expand(*grid, dim))
    return torch.cat(cos_parts, dim=-1).flatten(0, 2), torch.cat(sin_parts, dim=-1).flatten(0, 2)


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------


class TimeTextEmbed(nn.Module):
    """``mlp_t(sin(t)) [+ mlp_g(sin(g))] + mlp_text(pooled)`` -> ``(B, D)`` (keys ``timestep_embedder``,
    ``guidance_embedder``, ``text_embedder``, each ``linear_1`` / ``linear_2``). The sinusoids are float32,
    cast to the pooled text's dtype before their MLP. The token refiner's has no guidance embedder."""

    def __init__(self, dim: int, text_dim: int, with_guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = TimestepMLP(TIME_PROJ_DIM, dim)
        if with_guidance:
            self.guidance_embedder = TimestepMLP(TIME_PROJ_DIM, dim)
        self.text_embedder = TimestepMLP(text_dim, dim)
        self.with_guidance = with_guidance

    def forward(
        self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.timestep_embedder(sinusoidal_embedding(timestep).to(pooled.dtype))
        if self.with_guidance:
            if guidance is None:
                raise ValueError("this HunyuanVideo checkpoint is guidance-distilled: `guidance` is required")
            emb = emb + self.guidance_embedder(sinusoidal_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class AdaLNModulation(nn.Module):
    """``Linear(SiLU(temb))`` split into ``n_chunks`` per-sample vectors (key ``linear``). Chunk order is the
    checkpoint's: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) for the 6-way block
    modulation, (shift, scale, gate) for the 3-way, (scale, shift) for the output's, (gate_msa, gate_mlp) for
    the refiner's."""

    def __init__(self, dim: int, n_chunks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n_chunks * dim)
        self.n_chunks = n_chunks

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n_chunks, dim=1)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` with per-sample ``(B, D)`` modulation, in the activation dtype
    as the reference (the fused CUDA kernel computes in float32 and rounds once)."""
    return norm_modulate(x, shift[:, None], scale[:, None], norm="layer", eps=EPS, precision="input")


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` with a per-sample ``(B, D)`` gate (activation dtype; float32 when fused)."""
    return gated_residual(x, y, gate[:, None], precision="input")


# --------------------------------------------------------------------------------------------------
# Token refiner (``context_embedder``)
# --------------------------------------------------------------------------------------------------


class _RefinerAttention(ProjectionFusion):
    """Plain multi-head self-attention with biases (keys ``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""

    _GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv": ("to_q", "to_k", "to_v")}

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 1 is a dropout in the reference

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._GROUPS

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        q, k, v = (p.unflatten(-1, (self.heads, -1)) for p in self.project(x, "qkv"))
        return self.to_out[0](attention(q, k, v, backend=backend, attn_mask=mask))


class _SiluFeedForward(nn.Module):
    """Linear -> SiLU -> Linear, keyed ``net.0.proj`` and ``net.2`` like diffusers' ``FeedForward`` with
    ``activation_fn="linear-silu"``."""

    class _Proj(nn.Module):
        def __init__(self, dim_in: int, dim_out: int) -> None:
            super().__init__()
            self.proj = nn.Linear(dim_in, dim_out)

    def __init__(self, dim: int, mult: float) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([self._Proj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.silu(self.net[0].proj(x)))


class HunyuanVideoRefinerBlock(nn.Module):
    """Self-attention and MLP over the text, each gated by the refiner's conditioning (pre-norm with affine
    LayerNorms; keys ``norm1``, ``attn``, ``norm2``, ``ff``, ``norm_out``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = _RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.ff = _SiluFeedForward(dim, mlp_ratio)
        self.norm_out = AdaLNModulation(dim, 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        attn = self.attn(self.norm1(x), mask, backend)
        gate_msa, gate_mlp = self.norm_out(temb)
        x = x + attn * gate_msa[:, None]
        return x + self.ff(self.norm2(x)) * gate_mlp[:, None]


class _IndividualTokenRefiner(nn.Module):
    """The refiner's blocks (key ``refiner_blocks``)."""

    def __init__(self, dim: int, heads: int, num_layers: int, mlp_ratio: float) -> None:
        super().__init__()
        self.refiner_blocks = nn.ModuleList(
            [HunyuanVideoRefinerBlock(dim, heads, mlp_ratio) for _ in range(num_layers)]
        )


class HunyuanVideoTokenRefiner(nn.Module):
    """Text features to the DiT's width, refined by self-attention blocks conditioned on the timestep and the
    text's mean feature (keys ``time_text_embed``, ``proj_in``, ``token_refiner``)."""

    def __init__(self, text_dim: int, dim: int, heads: int, num_layers: int, mlp_ratio: float) -> None:
        super().__init__()
        self.time_text_embed = TimeTextEmbed(dim, text_dim, with_guidance=False)
        self.proj_in = nn.Linear(text_dim, dim)
        self.token_refiner = _IndividualTokenRefiner(dim, heads, num_layers, mlp_ratio)

    def forward(
        self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        if mask is None:
            # Every row a real token: the masked mean below with an all-ones mask, the same float32 sums.
            pooled = (text.float().sum(dim=1) / text.shape[1]).to(text.dtype)
            attn_mask = None
        else:
            weights = mask.float().unsqueeze(-1)
            pooled = ((text * weights).sum(dim=1) / weights.sum(dim=1)).to(text.dtype)
            # A token attends to the real tokens; a padding row to the first token only (no empty softmax).
            real = mask.bool()
            attn_mask = real[:, None, :, None] & real[:, None, None, :]
            attn_mask[:, :, :, 0] = True
        temb = self.time_text_embed(timestep, pooled)
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb, attn_mask, backend)
        return x


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _video_text_qk(
    video: torch.Tensor,
    text: torch.Tensor,
    video_norm: RMSNorm,
    text_norm: RMSNorm,
    rope: RopeTables,
    head_dim: int,
) -> torch.Tensor:
    """``cat(rope(rms(video)), rms(text))`` for q (or k) projections ``(B, N, H*Dh)`` and ``(B, T, H*Dh)``, as
    ``(B, N + T, H, Dh)``: each part normed per head with its own weight, only the video rotated, both written
    straight into their slices of one buffer (no concatenation copy)."""
    batch, n_video, inner = video.shape
    joint = video.new_empty(batch, n_video + text.shape[1], inner // head_dim, head_dim)
    qk_norm_rope(
        video.unflatten(-1, (-1, head_dim)), video_norm.weight, *rope, eps=video_norm.eps, norm_over="head",
        out=joint[:, :n_video],
    )  # fmt: skip
    qk_norm_rope(
        text.unflatten(-1, (-1, head_dim)), text_norm.weight, None, None, eps=text_norm.eps, norm_over="head",
        out=joint[:, n_video:],
    )  # fmt: skip
    return joint


class HunyuanAttention(ProjectionFusion):
    """QK-normed multi-head attention; with ``joint=True`` also the text stream's projections (keys ``to_q``,
    ``to_k``, ``to_v``, ``norm_q``, ``norm_k``; joint: ``add_{q,k,v}_proj``, ``norm_added_{q,k}``, ``to_out.0``,
    ``to_add_out``). Single-stream blocks have no output projection here (their ``proj_out`` takes attention and
    MLP together). q/k/v of a stream run as one GEMM after :meth:`fuse_projections`."""

    _SINGLE_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv": ("to_q", "to_k", "to_v")}
    _JOINT_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        **_SINGLE_GROUPS,
        "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    }

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.joint = joint
        inner = heads * head_dim
        self.norm_q = RMSNorm(head_dim, EPS)
        self.norm_k = RMSNorm(head_dim, EPS)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if joint:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # index 1 is a dropout in the reference
            self.to_add_out = nn.Linear(inner, dim)
            self.norm_added_q = RMSNorm(head_dim, EPS)
            self.norm_added_k = RMSNorm(head_dim, EPS)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._JOINT_GROUPS if self.joint else self._SINGLE_GROUPS

    def forward_single(
        self,
        x: torch.Tensor,
        n_video: int,
        rope: RopeTables,
        mask: torch.Tensor | None,
        backend: str,
        tokens: VideoAttention | None = None,
    ) -> torch.Tensor:
        """Self-attention over ``[video, text]`` (one stream, one set of weights) -> ``(B, N + T, H*Dh)``;
        ``tokens`` describes them to a sparse backend (None for the dense ones)."""
        q, k, v = self.project(x, "qkv")
        q = _video_text_qk(q[:, :n_video], q[:, n_video:], self.norm_q, self.norm_q, rope, self.head_dim)
        k = _video_text_qk(k[:, :n_video], k[:, n_video:], self.norm_k, self.norm_k, rope, self.head_dim)
        v = v.unflatten(-1, (-1, self.head_dim))
        return attention(q, k, v, backend=backend, attn_mask=mask, video=tokens)

    def forward_joint(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        rope: RopeTables,
        mask: torch.Tensor | None,
        backend: str,
        tokens: VideoAttention | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams attend over ``[video, text]``; returns the projected (video, text) outputs. ``tokens``
        describes them to a sparse backend (None for the dense ones)."""
        video_q, video_k, video_v = self.project(video, "qkv")
        text_q, text_k, text_v = self.project(text, "add_qkv")
        q = _video_text_qk(video_q, text_q, self.norm_q, self.norm_added_q, rope, self.head_dim)
        k = _video_text_qk(video_k, text_k, self.norm_k, self.norm_added_k, rope, self.head_dim)
        v = torch.cat((video_v, text_v), dim=1).unflatten(-1, (-1, self.head_dim))
        out = attention(q, k, v, backend=backend, attn_mask=mask, video=tokens)
        n_video = video.shape[1]
        return self.to_out[0](out[:, :n_video].contiguous()), self.to_add_out(out[:, n_video:].contiguous())


class HunyuanVideoTransformerBlock(nn.Module):
    """Dual-stream block: separate weights per stream, joint attention, adaLN-zero modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = AdaLNModulation(dim, 6)
        self.norm1_context = AdaLNModulation(dim, 6)
        self.attn = HunyuanAttention(dim, heads, head_dim, joint=True)
        self.ff = GeluTanhFeedForward(dim, mlp_ratio)
        self.ff_context = GeluTanhFeedForward(dim, mlp_ratio)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        rope: RopeTables,
        mask: torch.Tensor | None,
        backend: str,
        tokens: VideoAttention | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(temb)
        c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(temb)
        video_attn, text_attn = self.attn.forward_joint(
            modulated_layer_norm(video, shift_a, scale_a),
            modulated_layer_norm(text, c_shift_a, c_scale_a),
            rope,
            mask,
            backend,
            tokens,
        )
        video = gated_add(video, video_attn, gate_a)
        text = gated_add(text, text_attn, c_gate_a)
        video = gated_add(video, self.ff(modulated_layer_norm(video, shift_m, scale_m)), gate_m)
        text = gated_add(text, self.ff_context(modulated_layer_norm(text, c_shift_m, c_scale_m)), c_gate_m)
        return video, text


class PatchEmbed3D(nn.Module):
    """1 x p x p patches of the latents to tokens (key ``proj``, a 3D convolution)."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D, F', H', W') -> (B, N, D) as a transposed view, as the reference leaves it.
        return self.proj(x).flatten(2).transpose(1, 2)
