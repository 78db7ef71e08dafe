"""Native HunyuanVideo transformer (text-to-video: token refiner, dual-stream blocks, then single-stream blocks).

Module attribute names mirror diffusers' ``HunyuanVideoTransformer3DModel``, so ``state_dict()`` keys are the
checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``. Operation order
(including where values change dtype) follows the reference, because the goal is numerical parity with
diffusers, not just "the same math".

A forward, for latents ``(B, C, F, H, W)`` and Llama text features ``(B, T, text_embed_dim)``:

1. the latents become ``F * H/2 * W/2`` tokens of 1x2x2 patches (a 3D convolution); the text runs through
   the token refiner (``context_embedder``): self-attention blocks modulated by the timestep and the text's
   own mean feature;
2. the timestep, the embedded guidance scale and the CLIP pooled prompt embedding make one conditioning
   vector per sample (``temb``), which modulates every block;
3. ``transformer_blocks`` attend jointly over ``[video, text]`` with separate weights per stream, then
   ``single_transformer_blocks`` run ``[video, text]`` as one stream; 3D RoPE (frame, row, column) rotates
   the video tokens' queries and keys only;
4. the video tokens are modulated once more and folded back into latents.

Text padding. The reference pads every prompt to ``max_sequence_length`` and passes ``encoder_attention_mask``;
the padding is then excluded from the refiner's mean and attention and from every block's keys. Given a mask,
this model does exactly that. Without one (``encoder_attention_mask=None``) every text row is a real token: the
engine passes each prompt's real tokens only (``pipelines/text_lengths.py``), which is the same math without
any attention mask (the padding never reaches a real token's output, nor the video's), so attention keeps its
fastest kernels. The two agree up to the last bits of the softmax over a longer key sequence.

Shapes below: ``B`` batch, ``N`` video tokens, ``T`` text tokens, ``D`` inner dim, ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.attention import attention, resolve_attention_backend
from ...layers.embeddings import TIME_PROJ_DIM, TimestepMLP, sinusoidal_embedding
from ...layers.fused import gated_residual, norm_modulate, qk_norm_rope
from ...layers.linear import (
    GeluTanhFeedForward,
    ProjectionFusion,
    fuse_model_projections,
    linear_gelu_tanh,
    linear_split_accumulate,
    unfuse_model_projections,
)
from ...layers.norms import LayerNormNoAffine, RMSNorm
from ...layers.rotary import rope_tables_1d

__all__ = ["HunyuanVideoTransformer3DModel", "HunyuanVideoTransformerConfig", "video_rope_tables"]

#: Epsilon of every norm in the blocks (the reference's constant, not in config.json).
_EPS = 1e-6

RopeTables = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class HunyuanVideoTransformerConfig:
    """The fields of a HunyuanVideo ``transformer/config.json`` (defaults = diffusers' = the published model)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    image_condition_type: str | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim={list(self.rope_axes_dim)} must be 3 axes (frame, row, column) summing to "
                f"attention_head_dim={self.attention_head_dim}: RoPE rotates every channel of a head"
            )
        if self.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported: HunyuanVideo normalises q/k with rms_norm")
        if self.image_condition_type is not None:
            raise ValueError(
                f"image_condition_type={self.image_condition_type!r}: HunyuanVideo image-to-video is not supported "
                "yet (text-to-video checkpoints leave it unset)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> HunyuanVideoTransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


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


class _TimeTextEmbed(nn.Module):
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


class _AdaLNModulation(nn.Module):
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


def _norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` with per-sample ``(B, D)`` modulation, in the activation dtype
    as the reference (the fused CUDA kernel computes in float32 and rounds once)."""
    return norm_modulate(x, shift[:, None], scale[:, None], norm="layer", eps=_EPS, precision="input")


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
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
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = _RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.ff = _SiluFeedForward(dim, mlp_ratio)
        self.norm_out = _AdaLNModulation(dim, 2)

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
        self.time_text_embed = _TimeTextEmbed(dim, text_dim, with_guidance=False)
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


class _Attention(ProjectionFusion):
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
        self.norm_q = RMSNorm(head_dim, _EPS)
        self.norm_k = RMSNorm(head_dim, _EPS)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if joint:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # index 1 is a dropout in the reference
            self.to_add_out = nn.Linear(inner, dim)
            self.norm_added_q = RMSNorm(head_dim, _EPS)
            self.norm_added_k = RMSNorm(head_dim, _EPS)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._JOINT_GROUPS if self.joint else self._SINGLE_GROUPS

    def forward_single(
        self, x: torch.Tensor, n_video: int, rope: RopeTables, mask: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        """Self-attention over ``[video, text]`` (one stream, one set of weights) -> ``(B, N + T, H*Dh)``."""
        q, k, v = self.project(x, "qkv")
        q = _video_text_qk(q[:, :n_video], q[:, n_video:], self.norm_q, self.norm_q, rope, self.head_dim)
        k = _video_text_qk(k[:, :n_video], k[:, n_video:], self.norm_k, self.norm_k, rope, self.head_dim)
        return attention(q, k, v.unflatten(-1, (-1, self.head_dim)), backend=backend, attn_mask=mask)

    def forward_joint(
        self, video: torch.Tensor, text: torch.Tensor, rope: RopeTables, mask: torch.Tensor | None, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams attend over ``[video, text]``; returns the projected (video, text) outputs."""
        video_q, video_k, video_v = self.project(video, "qkv")
        text_q, text_k, text_v = self.project(text, "add_qkv")
        q = _video_text_qk(video_q, text_q, self.norm_q, self.norm_added_q, rope, self.head_dim)
        k = _video_text_qk(video_k, text_k, self.norm_k, self.norm_added_k, rope, self.head_dim)
        v = torch.cat((video_v, text_v), dim=1).unflatten(-1, (-1, self.head_dim))
        out = attention(q, k, v, backend=backend, attn_mask=mask)
        n_video = video.shape[1]
        return self.to_out[0](out[:, :n_video].contiguous()), self.to_add_out(out[:, n_video:].contiguous())


class HunyuanVideoTransformerBlock(nn.Module):
    """Dual-stream block: separate weights per stream, joint attention, adaLN-zero modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = _AdaLNModulation(dim, 6)
        self.norm1_context = _AdaLNModulation(dim, 6)
        self.attn = _Attention(dim, heads, head_dim, joint=True)
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(temb)
        c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(temb)
        video_attn, text_attn = self.attn.forward_joint(
            _norm_modulate(video, shift_a, scale_a), _norm_modulate(text, c_shift_a, c_scale_a), rope, mask, backend
        )
        video = _gated_residual(video, video_attn, gate_a)
        text = _gated_residual(text, text_attn, c_gate_a)
        video = _gated_residual(video, self.ff(_norm_modulate(video, shift_m, scale_m)), gate_m)
        text = _gated_residual(text, self.ff_context(_norm_modulate(text, c_shift_m, c_scale_m)), c_gate_m)
        return video, text


class HunyuanVideoSingleTransformerBlock(nn.Module):
    """Single-stream block over ``[video, text]``: attention and MLP in parallel, one output projection.

    On CUDA the MLP's GELU runs in its GEMM's epilogue and ``proj_out(cat(attn, mlp))`` runs as two GEMMs
    accumulating into one output (:mod:`sgl_diffusion.layers.linear`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.attn = _Attention(dim, heads, head_dim, joint=False)
        self.norm = _AdaLNModulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        n_video: int,
        temb: torch.Tensor,
        rope: RopeTables,
        mask: torch.Tensor | None,
        backend: str,
    ) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)
        h = _norm_modulate(x, shift, scale)
        mlp = linear_gelu_tanh(h, self.proj_mlp.weight, self.proj_mlp.bias)
        attn = self.attn.forward_single(h, n_video, rope, mask, backend)
        out = linear_split_accumulate((attn, mlp), self.proj_out.weight, self.proj_out.bias)
        return _gated_residual(x, out, gate)


class _PatchEmbed(nn.Module):
    """1 x p x p patches of the latents to tokens (key ``proj``, a 3D convolution)."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D, F', H', W') -> (B, N, D) as a transposed view, as the reference leaves it.
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class HunyuanVideoTransformer3DModel(nn.Module):
    """HunyuanVideo DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters (no buffers); RoPE tables are computed on the
    latents' device in every forward (a few small kernels; a CUDA graph captures them with the rest).

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here so a bad
            name fails at load time.
    """

    #: The block lists `--enable-torch-compile` compiles block by block (the refiner's two blocks run on the
    #: text alone and stay eager).
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, config: HunyuanVideoTransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim = config.inner_dim
        heads, head_dim, ratio = config.num_attention_heads, config.attention_head_dim, config.mlp_ratio
        patch = (config.patch_size_t, config.patch_size, config.patch_size)

        self.x_embedder = _PatchEmbed(patch, config.in_channels, dim)
        self.context_embedder = HunyuanVideoTokenRefiner(
            config.text_embed_dim, dim, heads, config.num_refiner_layers, ratio
        )
        self.time_text_embed = _TimeTextEmbed(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(
            [HunyuanVideoTransformerBlock(dim, heads, head_dim, ratio) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [HunyuanVideoSingleTransformerBlock(dim, heads, head_dim, ratio) for _ in range(config.num_single_layers)]
        )
        self.norm_out = _AdaLNModulation(dim, 2)
        self.final_norm = LayerNormNoAffine(dim, eps=_EPS)
        self.proj_out = nn.Linear(dim, math.prod(patch) * config.resolved_out_channels)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | HunyuanVideoTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> HunyuanVideoTransformer3DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, HunyuanVideoTransformerConfig) else HunyuanVideoTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    def token_grid(self, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """The video token grid (frames, rows, columns) of latents ``(B, C, F, H, W)``."""
        _, _, frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        return frames // p_t, height // p, width // p

    def tokens_per_sample(self, hidden_states: torch.Tensor) -> int:
        """Video tokens of one sample of the latents ``(B, C, F, H, W)``."""
        return math.prod(self.token_grid(hidden_states))

    @staticmethod
    def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device, name: str) -> torch.Tensor:
        """A scalar, 0-d or ``(B,)`` tensor as ``(B,)`` (per-sample values are allowed)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
        t = t.to(device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1 and batch != 1):
            return t.reshape(()).expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"`{name}` must be a scalar or have one value per sample ({batch}), got {tuple(t.shape)}")
        return t

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for a batch of video latents.

        Args:
            hidden_states: ``(B, in_channels, F, H, W)`` latents.
            timestep: ``(B,)`` (or scalar) scheduler timestep on the 0..1000 scale, used in float32 (the pipeline
                passes it in the latents' dtype, float32).
            encoder_hidden_states: ``(B, T, text_embed_dim)`` Llama features of the prompt (the template prefix
                cropped off).
            pooled_projections: ``(B, pooled_projection_dim)`` CLIP pooled prompt embedding.
            guidance: ``(B,)`` (or scalar) embedded guidance scale **times 1000**, as the pipeline passes it
                (computed in the transformer's dtype). Required iff ``config.guidance_embeds``.
            encoder_attention_mask: ``(B, T)`` 1 for real text tokens, 0 for padding, as the reference's pipeline
                passes it; None when every text row is a real token (see the module docstring).

        Returns:
            ``(B, out_channels, F, H, W)`` in the activation dtype.

        Samples are independent (timestep, guidance and pooled text only enter the per-sample modulation).
        """
        batch = hidden_states.shape[0]
        grid = self.token_grid(hidden_states)
        device = hidden_states.device
        rope = video_rope_tables(grid, self.config.rope_axes_dim, self.config.rope_theta, device)
        backend = self.attention_backend

        t = self._per_sample(timestep, batch, device, "timestep")
        g = None if guidance is None else self._per_sample(guidance, batch, device, "guidance")
        temb = self.time_text_embed(t, pooled_projections, g)
        video = self.x_embedder(hidden_states)
        text = self.context_embedder(encoder_hidden_states, t, encoder_attention_mask, backend)

        n_video, n_text = video.shape[1], text.shape[1]
        mask = None
        if encoder_attention_mask is not None:
            # The reference keeps the first (video tokens + number of real text tokens) keys of every row.
            real = encoder_attention_mask.sum(dim=1, dtype=torch.int)
            mask = torch.arange(n_video + n_text, device=device)[None] < (n_video + real)[:, None]

        for block in self.transformer_blocks:
            video, text = block(video, text, temb, rope, mask, backend)
        x = torch.cat((video, text), dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, n_video, temb, rope, mask, backend)
        video = x[:, :n_video]

        # The output modulation takes SiLU(temb) cast to the activation dtype first.
        scale, shift = self.norm_out.linear(F.silu(temb).to(video.dtype)).chunk(2, dim=1)
        video = self.proj_out(_norm_modulate(video, shift, scale))

        # Unpatchify: (B, N, C * pt * p * p) -> (B, C, F, H, W); a token's channels come first.
        p, p_t = self.config.patch_size, self.config.patch_size_t
        video = video.reshape(batch, *grid, -1, p_t, p, p)
        video = video.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return video.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def fuse_projections(self) -> int:
        """Pack projections that read the same input into one GEMM (call after the weights are loaded): q/k/v
        of every attention (both streams of a dual-stream block, the refiner's). State-dict keys and values are
        unchanged. Returns the number of packed groups."""
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
