"""Native HunyuanVideo-1.5 transformer (token refiner, ByT5 glyph projection, image projection, dual-stream blocks).

Module attribute names mirror diffusers' ``HunyuanVideo15Transformer3DModel``, so ``state_dict()`` keys are the
checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``. The blocks are the
Hunyuan lineage's (``layers/hunyuan_dit.py``, shared with HunyuanVideo 1.0); operation order follows the reference.

A forward, for latents ``(B, C, F, H, W)`` (the noisy latents, the condition latents and the condition mask
stacked on channels by the pipeline):

1. the latents become ``F * H * W`` tokens of 1x1x1 patches (a 3D convolution); the timestep alone makes the
   conditioning vector ``temb`` (no pooled text, no guidance embedding);
2. three text-side streams, each tagged by a learned type embedding (``cond_type_embed`` 0, 1, 2): the
   Qwen2.5-VL prompt features through the token refiner, the ByT5 glyph features (quoted text in the prompt)
   through an MLP, and, for image-to-video, the SigLIP image features through another;
3. the text-side tokens are laid out ``[image, glyph, prompt]`` and ``transformer_blocks`` attend jointly over
   ``[video, text-side]``; 3D RoPE rotates the video tokens only;
4. the video tokens are modulated once more and folded back into latents.

Text padding. The reference pads the prompt to 1000 tokens and the glyph text to 256, passes masks, moves every
row's real tokens to the front and masks the rest out of every attention (text-to-video also passes 729 all-zero
image tokens, masked out). Padding never reaches a real token's output nor the video's, so this model takes the
real tokens only and attends without any mask (``pipelines/text_lengths.py`` groups a batch's rows by length):
the same math, up to the last bits of softmaxes and means over shorter rows.
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
from ...layers.attention import resolve_attention_backend
from ...layers.embeddings import TIME_PROJ_DIM, TimestepMLP, sinusoidal_embedding
from ...layers.hunyuan_dit import (
    HunyuanVideoTokenRefiner,
    HunyuanVideoTransformerBlock,
    PatchEmbed3D,
    modulated_layer_norm,
    video_rope_tables,
)
from ...layers.linear import fuse_model_projections, unfuse_model_projections

__all__ = ["HunyuanVideo15Transformer3DModel", "HunyuanVideo15TransformerConfig"]

#: The token refiner's MLP ratio and the glyph projection's hidden width: constants of the reference.
_REFINER_MLP_RATIO = 4.0
_GLYPH_HIDDEN = 2048
#: ``cond_type_embed`` rows: which text-side stream a token comes from.
_PROMPT, _GLYPH, _IMAGE = 0, 1, 2


@dataclass(frozen=True)
class HunyuanVideo15TransformerConfig:
    """The fields of a HunyuanVideo-1.5 ``transformer/config.json`` (defaults = diffusers')."""

    in_channels: int = 65
    out_channels: int | None = 32
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 1
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 3584
    text_embed_2_dim: int = 1472
    image_embed_dim: int = 1152
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    target_size: int = 640
    task_type: str = "i2v"
    use_meanflow: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim={list(self.rope_axes_dim)} must be 3 axes (frame, row, column) summing to "
                f"attention_head_dim={self.attention_head_dim}: RoPE rotates every channel of a head"
            )
        if self.qk_norm != "rms_norm":
            raise ValueError(
                f"qk_norm={self.qk_norm!r} is not supported: HunyuanVideo-1.5 normalises q/k with rms_norm"
            )
        if self.use_meanflow:
            raise ValueError(
                "use_meanflow=True (the super-resolution checkpoints' second timestep) is not supported yet"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> HunyuanVideo15TransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


class _TimeEmbed(nn.Module):
    """``mlp(sin(t))`` (key ``timestep_embedder``); the sinusoid is cast to the timestep's dtype first, as the
    reference does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepMLP(TIME_PROJ_DIM, dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(sinusoidal_embedding(timestep).to(timestep.dtype))


class _GlyphProjection(nn.Module):
    """ByT5 features to the DiT's width: LayerNorm, three linears with GELU between (keys ``norm``,
    ``linear_1..3``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.linear_3 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.linear_1(self.norm(x)))
        return self.linear_3(F.gelu(self.linear_2(x)))


class _ImageProjection(nn.Module):
    """SigLIP image features to the DiT's width (keys ``norm_in``, ``linear_1``, ``linear_2``, ``norm_out``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, in_dim)
        self.linear_2 = nn.Linear(in_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(F.gelu(self.linear_1(self.norm_in(x)))))


class _NormOut(nn.Module):
    """The output modulation's ``Linear`` (key ``linear``): (scale, shift) from ``SiLU(temb)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)


class HunyuanVideo15Transformer3DModel(nn.Module):
    """HunyuanVideo-1.5 DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Holds only parameters (no buffers), so
    it builds under ``torch.device("meta")``; RoPE tables are computed on the latents' device in every forward.

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here so a bad
            name fails at load time.
    """

    #: The block list `--enable-torch-compile` compiles block by block (the refiner's blocks run on the text
    #: alone and stay eager).
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def __init__(self, config: HunyuanVideo15TransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        patch = (config.patch_size_t, config.patch_size, config.patch_size)

        self.x_embedder = PatchEmbed3D(patch, config.in_channels, dim)
        self.image_embedder = _ImageProjection(config.image_embed_dim, dim)
        self.context_embedder = HunyuanVideoTokenRefiner(
            config.text_embed_dim, dim, heads, config.num_refiner_layers, _REFINER_MLP_RATIO
        )
        self.context_embedder_2 = _GlyphProjection(config.text_embed_2_dim, _GLYPH_HIDDEN, dim)
        self.time_embed = _TimeEmbed(dim)
        self.cond_type_embed = nn.Embedding(3, dim)
        self.transformer_blocks = nn.ModuleList(
            [HunyuanVideoTransformerBlock(dim, heads, head_dim, config.mlp_ratio) for _ in range(config.num_layers)]
        )
        self.norm_out = _NormOut(dim)
        self.proj_out = nn.Linear(dim, math.prod(patch) * config.resolved_out_channels)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | HunyuanVideo15TransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> HunyuanVideo15Transformer3DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = (
            cfg if isinstance(cfg, HunyuanVideo15TransformerConfig) else HunyuanVideo15TransformerConfig.from_dict(cfg)
        )
        return cls(config, attention_backend=attention_backend)

    def token_grid(self, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """The video token grid (frames, rows, columns) of latents ``(B, C, F, H, W)``."""
        _, _, frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        return frames // p_t, height // p, width // p

    def tokens_per_sample(self, hidden_states: torch.Tensor) -> int:
        """Video tokens of one sample of the latents ``(B, C, F, H, W)``."""
        return math.prod(self.token_grid(hidden_states))

    def _typed(self, tokens: torch.Tensor, kind: int) -> torch.Tensor:
        """``tokens + cond_type_embed(kind)``: which stream a text-side token comes from."""
        return tokens + self.cond_type_embed(torch.full(tokens.shape[:2], kind, dtype=torch.long, device=tokens.device))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_2: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for a batch of video latents.

        Args:
            hidden_states: ``(B, in_channels, F, H, W)``: noisy latents, condition latents and condition mask.
            timestep: ``(B,)`` scheduler timesteps on the 0..1000 scale, in the latents' dtype.
            encoder_hidden_states: ``(B, T, text_embed_dim)`` Qwen2.5-VL features, every row a real token.
            encoder_hidden_states_2: ``(B, T2, text_embed_2_dim)`` ByT5 glyph features, every row a real token
                (``T2`` may be 0: a prompt without quoted text).
            image_embeds: ``(B, I, image_embed_dim)`` SigLIP features of the first frame (image-to-video), or None
                for text-to-video (the reference's all-zero, masked-out image tokens).

        Returns:
            ``(B, out_channels, F, H, W)`` in the activation dtype.
        """
        batch = hidden_states.shape[0]
        grid = self.token_grid(hidden_states)
        device = hidden_states.device
        rope = video_rope_tables(grid, self.config.rope_axes_dim, self.config.rope_theta, device)
        backend = self.attention_backend
        if timestep.ndim != 1 or timestep.shape[0] != batch:
            raise ValueError(f"`timestep` must have one value per sample ({batch}), got {tuple(timestep.shape)}")

        temb = self.time_embed(timestep)
        video = self.x_embedder(hidden_states)
        prompt = self._typed(self.context_embedder(encoder_hidden_states, timestep, None, backend), _PROMPT)
        glyph = self._typed(self.context_embedder_2(encoder_hidden_states_2), _GLYPH)
        parts = [glyph, prompt]
        if image_embeds is not None:
            parts.insert(0, self._typed(self.image_embedder(image_embeds), _IMAGE))
        text = torch.cat(parts, dim=1)

        for block in self.transformer_blocks:
            video, text = block(video, text, temb, rope, None, backend)

        # The output modulation takes SiLU(temb) cast to the activation dtype first.
        scale, shift = self.norm_out.linear(F.silu(temb).to(video.dtype)).chunk(2, dim=1)
        video = self.proj_out(modulated_layer_norm(video, shift, scale))

        # Unpatchify: (B, N, C * pt * p * p) -> (B, C, F, H, W); a token's channels come first.
        p, p_t = self.config.patch_size, self.config.patch_size_t
        video = video.reshape(batch, *grid, -1, p_t, p, p)
        video = video.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return video.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def fuse_projections(self) -> int:
        """Pack q/k/v projections that read the same input into one GEMM (call after the weights are loaded).
        State-dict keys and values are unchanged. Returns the number of packed groups."""
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
