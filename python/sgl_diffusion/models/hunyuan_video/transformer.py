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
from ...layers.attention import DEFAULT_ATTENTION_BACKEND, VideoAttention, resolve_attention_backend
from ...layers.hunyuan_dit import (
    EPS,
    AdaLNModulation,
    HunyuanAttention,
    HunyuanVideoTokenRefiner,
    HunyuanVideoTransformerBlock,
    PatchEmbed3D,
    RopeTables,
    TimeTextEmbed,
    gated_add,
    modulated_layer_norm,
    video_rope_tables,
)
from ...layers.linear import (
    fuse_model_projections,
    linear_gelu_tanh,
    linear_split_accumulate,
    unfuse_model_projections,
)
from ...layers.norms import LayerNormNoAffine
from ...layers.sparse_attention import VSA_VIDEO_ONLY, VideoSparseSettings

__all__ = ["HunyuanVideoTransformer3DModel", "HunyuanVideoTransformerConfig", "video_rope_tables"]


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


class HunyuanVideoSingleTransformerBlock(nn.Module):
    """Single-stream block over ``[video, text]``: attention and MLP in parallel, one output projection.

    On CUDA the MLP's GELU runs in its GEMM's epilogue and ``proj_out(cat(attn, mlp))`` runs as two GEMMs
    accumulating into one output (:mod:`sgl_diffusion.layers.linear`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.attn = HunyuanAttention(dim, heads, head_dim, joint=False)
        self.norm = AdaLNModulation(dim, 3)
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
        tokens: VideoAttention | None = None,
    ) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)
        h = modulated_layer_norm(x, shift, scale)
        mlp = linear_gelu_tanh(h, self.proj_mlp.weight, self.proj_mlp.bias)
        attn = self.attn.forward_single(h, n_video, rope, mask, backend, tokens)
        out = linear_split_accumulate((attn, mlp), self.proj_out.weight, self.proj_out.bias)
        return gated_add(x, out, gate)


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
            name fails at load time. ``sliding_tile_attn`` runs the blocks' joint attention over ``[video, text]``
            sparsely (video reads video by tiles, and all the text; the text reads everything: FastVideo's
            HunyuanVideo STA), the text refiner's attention on ``torch_sdpa``; ``video_sparse_attn`` (video-only
            self-attention) is refused.
        video_sparse: the sparse backend's settings (STA's mask strategy: ``num_layers + num_single_layers``
            layers, dual-stream blocks first).
    """

    #: The block lists `--enable-torch-compile` compiles block by block (the refiner's two blocks run on the
    #: text alone and stay eager).
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")

    def __init__(
        self,
        config: HunyuanVideoTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
        video_sparse: VideoSparseSettings | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend, video_tokens=True)
        self.video_sparse = video_sparse or VideoSparseSettings()
        if self.attention_backend == "video_sparse_attn":
            raise ValueError(VSA_VIDEO_ONLY)
        layers = config.num_layers + config.num_single_layers
        self.video_sparse.check_model(self.attention_backend, layers, config.num_attention_heads)
        dim = config.inner_dim
        heads, head_dim, ratio = config.num_attention_heads, config.attention_head_dim, config.mlp_ratio
        patch = (config.patch_size_t, config.patch_size, config.patch_size)

        self.x_embedder = PatchEmbed3D(patch, config.in_channels, dim)
        self.context_embedder = HunyuanVideoTokenRefiner(
            config.text_embed_dim, dim, heads, config.num_refiner_layers, ratio
        )
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(
            [HunyuanVideoTransformerBlock(dim, heads, head_dim, ratio) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [HunyuanVideoSingleTransformerBlock(dim, heads, head_dim, ratio) for _ in range(config.num_single_layers)]
        )
        self.norm_out = AdaLNModulation(dim, 2)
        self.final_norm = LayerNormNoAffine(dim, eps=EPS)
        self.proj_out = nn.Linear(dim, math.prod(patch) * config.resolved_out_channels)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | HunyuanVideoTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
        video_sparse: VideoSparseSettings | None = None,
    ) -> HunyuanVideoTransformer3DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, HunyuanVideoTransformerConfig) else HunyuanVideoTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend, video_sparse=video_sparse)

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
        attention_step: int | None = None,
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
            attention_step: the denoising step's index (from 0), which sliding tile attention's mask strategy
                is keyed by; unused by the other backends.

        Returns:
            ``(B, out_channels, F, H, W)`` in the activation dtype.

        Samples are independent (timestep, guidance and pooled text only enter the per-sample modulation).
        """
        batch = hidden_states.shape[0]
        grid = self.token_grid(hidden_states)
        device = hidden_states.device
        rope = video_rope_tables(grid, self.config.rope_axes_dim, self.config.rope_theta, device)
        backend = self.attention_backend
        sparse = backend == "sliding_tile_attn"

        t = self._per_sample(timestep, batch, device, "timestep")
        g = None if guidance is None else self._per_sample(guidance, batch, device, "guidance")
        temb = self.time_text_embed(t, pooled_projections, g)
        video = self.x_embedder(hidden_states)
        # The refiner attends over the text alone: a sparse backend has no video grid there.
        text = self.context_embedder(
            encoder_hidden_states, t, encoder_attention_mask, DEFAULT_ATTENTION_BACKEND if sparse else backend
        )

        n_video, n_text = video.shape[1], text.shape[1]
        mask = None
        if encoder_attention_mask is not None:
            # The reference keeps the first (video tokens + number of real text tokens) keys of every row.
            real = encoder_attention_mask.sum(dim=1, dtype=torch.int)
            mask = torch.arange(n_video + n_text, device=device)[None] < (n_video + real)[:, None]

        def tokens(layer: int) -> VideoAttention | None:
            if not sparse:
                return None
            # The windows are looked up here, outside the compiled blocks (see VideoAttention.windows).
            windows = self.video_sparse.sta_windows(attention_step, layer, self.config.num_attention_heads)
            return VideoAttention(grid, layer, self.video_sparse, attention_step, text_tokens=n_text, windows=windows)

        for layer, block in enumerate(self.transformer_blocks):
            video, text = block(video, text, temb, rope, mask, backend, tokens(layer))
        x = torch.cat((video, text), dim=1)
        for layer, block in enumerate(self.single_transformer_blocks, start=len(self.transformer_blocks)):
            x = block(x, n_video, temb, rope, mask, backend, tokens(layer))
        video = x[:, :n_video]

        # The output modulation takes SiLU(temb) cast to the activation dtype first.
        scale, shift = self.norm_out.linear(F.silu(temb).to(video.dtype)).chunk(2, dim=1)
        video = self.proj_out(modulated_layer_norm(video, shift, scale))

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
