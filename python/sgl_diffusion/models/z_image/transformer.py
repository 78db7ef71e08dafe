"""Native Z-Image transformer (single-stream DiT: image and caption tokens in one sequence).

Module attribute names mirror diffusers' ``ZImageTransformer2DModel``, so ``state_dict()`` keys are the
checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``. Operation order
(including where values change dtype, and which rows a GEMM sees) follows the reference, because the goal is
numerical parity with diffusers, not just "the same math".

A forward, for latents ``(B, C, H, W)`` and caption features ``(B, L, cap_feat_dim)``:

1. the latents become ``H/2 * W/2`` tokens of 2x2 patches, the caption stays ``L`` tokens; each sequence is
   padded to a multiple of 32 (:data:`SEQ_MULTIPLE`) with a learned pad token (``x_pad_token``,
   ``cap_pad_token``), which the attention sees like any other token;
2. the image tokens run through ``noise_refiner`` (modulated by the timestep), the caption tokens through
   ``context_refiner`` (not modulated);
3. ``[image, caption]`` runs through ``layers`` as one sequence, then the final layer; the image's real
   tokens are folded back into latents.

The samples of a batch may have captions of different lengths as long as they pad to the same multiple of
32 (the engine groups rows so, see ``pipelines/text_lengths.py``): their sequences are then alike and no
attention mask is ever needed. The reference pads a batch of otherwise mixed lengths and masks; the rows
come out the same up to the last bits.

Shapes below: ``B`` batch, ``N`` image tokens, ``T`` caption tokens (both padded), ``D`` the model width,
``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.attention import attention, resolve_attention_backend
from ...layers.fused import qk_norm_rope
from ...layers.linear import ProjectionFusion, fuse_model_projections, unfuse_model_projections
from ...layers.norms import LayerNormNoAffine, RMSNorm
from .rope import RopeTables, ZImageRope

__all__ = ["SEQ_MULTIPLE", "ZImageTransformer2DModel", "ZImageTransformerConfig", "padded_length"]

#: Image and caption sequences are padded to a multiple of this many tokens (a fact of the architecture).
SEQ_MULTIPLE = 32
#: Width of the timestep embedding that modulates the blocks (at most the model width).
_ADALN_DIM = 256
#: Sinusoid width fed to the timestep MLP, and the MLP's hidden width.
_TIME_FREQ_DIM = 256
_TIME_MID_DIM = 1024
#: The attention's q/k RMSNorm epsilon (fixed in the reference, whatever ``norm_eps`` says).
_QK_NORM_EPS = 1e-5
_FINAL_NORM_EPS = 1e-6


def padded_length(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of :data:`SEQ_MULTIPLE`."""
    return tokens + (-tokens) % SEQ_MULTIPLE


@dataclass(frozen=True)
class ZImageTransformerConfig:
    """The fields of a Z-Image ``transformer/config.json`` (defaults = diffusers')."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    #: Read by no layer: the reference's attention has as many key/value heads as query heads.
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = field(default=(32, 48, 48))
    axes_lens: tuple[int, ...] = field(default=(1024, 512, 512))

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the frozen dataclass hashable.
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.all_patch_size) != len(self.all_f_patch_size) or not self.all_patch_size:
            raise ValueError("all_patch_size and all_f_patch_size must be non-empty and of equal length")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(
                f"sum(axes_dims)={sum(self.axes_dims)} must equal the head dim {self.head_dim}: RoPE rotates every "
                "channel of a head"
            )
        if self.siglip_feat_dim is not None:
            raise ValueError("siglip_feat_dim is set: Z-Image-Omni (image conditioning) is not supported yet")
        if not self.qk_norm:
            # Every published Z-Image checkpoint normalises q and k; the variant without has no weights to test.
            raise ValueError("qk_norm=False is not supported: every Z-Image checkpoint has q/k RMS norms")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, _ADALN_DIM)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> ZImageTransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


def _patch_key(patch_size: int, f_patch_size: int) -> str:
    """The ``all_x_embedder`` / ``all_final_layer`` key of a patch size (checkpoint naming)."""
    return f"{patch_size}-{f_patch_size}"


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int = _TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """``(N,) -> (N, dim)`` float32 ``[cos | sin]`` of ``t * max_period ** (-i / (dim/2))``; ``t`` is already
    scaled by ``t_scale``. Operation order as the reference's, so the float32 values match."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    embedding = torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)
    if dim % 2:
        embedding = torch.cat((embedding, torch.zeros_like(embedding[:, :1])), dim=-1)
    return embedding


class _TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_TIME_FREQ_DIM, _TIME_MID_DIM), nn.SiLU(), nn.Linear(_TIME_MID_DIM, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t).to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


class _Attention(ProjectionFusion):
    """Self-attention with q/k RMS norms (per head) and RoPE; no biases.

    Keys ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``norm_q``, ``norm_k``. After :meth:`fuse_projections`
    the q/k/v projections run as one GEMM.
    """

    _GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv": ("to_q", "to_k", "to_v")}

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        # A ModuleList so the key is ``to_out.0`` (index 1 is a dropout in the reference: no parameters).
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, _QK_NORM_EPS)
        self.norm_k = RMSNorm(head_dim, _QK_NORM_EPS)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._GROUPS

    def forward(self, x: torch.Tensor, rope: RopeTables, backend: str) -> torch.Tensor:
        q, k, v = (p.unflatten(-1, (self.heads, -1)) for p in self.project(x, "qkv"))
        # RMSNorm over each head, then the interleaved rotation (in float32, rounded back: the reference's
        # complex multiply in float32 gives the same values).
        q = qk_norm_rope(q, self.norm_q.weight, *rope, eps=self.norm_q.eps, norm_over="head")
        k = qk_norm_rope(k, self.norm_k.weight, *rope, eps=self.norm_k.eps, norm_over="head")
        return self.to_out[0](attention(q, k, v, backend=backend))


class _FeedForward(ProjectionFusion):
    """SwiGLU ``w2(silu(w1 x) * w3 x)`` (keys ``w1``, ``w2``, ``w3``; no biases); ``w1``/``w3`` run as one
    GEMM after :meth:`fuse_projections`."""

    _GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"w13": ("w1", "w3")}

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._GROUPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x, "w13")
        return self.w2(F.silu(gate) * up)


class ZImageTransformerBlock(nn.Module):
    """Pre- and post-normed attention and SwiGLU, each gated: with ``modulation`` the timestep scales the
    pre-norm outputs (``1 + scale``) and gates the residuals (``tanh(gate)``); without (the caption refiner)
    both are plain residuals."""

    def __init__(self, dim: int, heads: int, norm_eps: float, adaln_dim: int, *, modulation: bool) -> None:
        super().__init__()
        self.modulation = modulation
        self.attention = _Attention(dim, heads)
        # The reference's hidden width: int(dim / 3 * 8), a float expression (10240 for dim 3840).
        self.feed_forward = _FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        if modulation:
            # Index 0 (no SiLU before it, unlike the final layer's).
            self.adaLN_modulation = nn.Sequential(nn.Linear(adaln_dim, 4 * dim))

    def forward(self, x: torch.Tensor, rope: RopeTables, adaln: torch.Tensor | None, backend: str) -> torch.Tensor:
        """``x`` ``(B, S, D)``; ``adaln`` the ``(B, adaln_dim)`` timestep embedding (None without modulation)."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, backend))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        if adaln is None:
            raise ValueError("a modulated Z-Image block needs the timestep embedding")
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        attn = self.attention(self.attention_norm1(x) * scale_msa, rope, backend)
        x = x + gate_msa * self.attention_norm2(attn)
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class _FinalLayer(nn.Module):
    """``linear(layer_norm(x) * (1 + scale))`` with ``scale = Linear(SiLU(adaln))`` (keys ``linear``,
    ``adaLN_modulation.1``)."""

    def __init__(self, dim: int, out_channels: int, adaln_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNormNoAffine(dim, _FINAL_NORM_EPS)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = (1.0 + self.adaLN_modulation(adaln)).unsqueeze(1)
        return self.linear(self.norm_final(x) * scale)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class ZImageTransformer2DModel(nn.Module):
    """Z-Image DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters; the RoPE tables are built on first use.

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here so a bad
            name fails at load time.
    """

    #: The compile units (:mod:`sgl_diffusion.runtime.compile`): the refiners' and the main blocks.
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, config: ZImageTransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim, heads, eps, adaln_dim = config.dim, config.n_heads, config.norm_eps, config.adaln_dim
        out_channels = config.in_channels

        self.all_x_embedder = nn.ModuleDict()
        self.all_final_layer = nn.ModuleDict()
        for patch, f_patch in zip(config.all_patch_size, config.all_f_patch_size, strict=True):
            patch_dim = f_patch * patch * patch * config.in_channels
            self.all_x_embedder[_patch_key(patch, f_patch)] = nn.Linear(patch_dim, dim)
            self.all_final_layer[_patch_key(patch, f_patch)] = _FinalLayer(
                dim, patch * patch * f_patch * out_channels, adaln_dim
            )

        def blocks(count: int, *, modulation: bool) -> nn.ModuleList:
            return nn.ModuleList(
                [ZImageTransformerBlock(dim, heads, eps, adaln_dim, modulation=modulation) for _ in range(count)]
            )

        self.noise_refiner = blocks(config.n_refiner_layers, modulation=True)
        self.context_refiner = blocks(config.n_refiner_layers, modulation=False)
        self.t_embedder = _TimestepEmbedder(adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(config.cap_feat_dim, eps), nn.Linear(config.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.empty(1, dim))
        self.cap_pad_token = nn.Parameter(torch.empty(1, dim))
        self.layers = blocks(config.n_layers, modulation=True)
        self.rope = ZImageRope(config.axes_dims, config.axes_lens, config.rope_theta)

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any] | ZImageTransformerConfig, attention_backend: str | None = "torch_sdpa"
    ) -> ZImageTransformer2DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, ZImageTransformerConfig) else ZImageTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    @staticmethod
    def _pad_with_last(tokens: torch.Tensor, lengths: Sequence[int], total: int) -> torch.Tensor:
        """``(B, S, C)`` with row ``i``'s first ``lengths[i]`` tokens, each row extended to ``total`` tokens by
        repeating its last real one: the rows the reference embeds before it puts the pad token in their place
        (so the embedding GEMM sees the reference's matrix)."""
        if all(length == tokens.shape[1] for length in lengths):
            extra = total - tokens.shape[1]
            return tokens if extra == 0 else torch.cat((tokens, tokens[:, -1:].expand(-1, extra, -1)), dim=1)
        return torch.stack(
            [
                torch.cat((row[:length], row[length - 1 : length].expand(total - length, -1)))
                for row, length in zip(tokens, lengths, strict=True)
            ]
        )

    @staticmethod
    def _with_pad_token(embedded: torch.Tensor, lengths: Sequence[int], pad_token: torch.Tensor) -> torch.Tensor:
        """Row ``i``'s first ``lengths[i]`` embedded tokens, then the learned pad token at every padded position."""
        total = embedded.shape[1]
        pad = pad_token.to(embedded.dtype)
        if len(set(lengths)) == 1:
            length = lengths[0]
            if length == total:
                return embedded
            return torch.cat((embedded[:, :length], pad.expand(embedded.shape[0], total - length, -1)), dim=1)
        rows = [torch.cat((row[:n], pad.expand(total - n, -1))) for row, n in zip(embedded, lengths, strict=True)]
        return torch.stack(rows)

    @staticmethod
    def _caption_lengths(caption_lengths: Sequence[int] | None, batch: int, tokens: int) -> tuple[int, ...]:
        """Each row's real caption tokens (all ``tokens`` when not given), checked: rows must pad alike."""
        lengths = (tokens,) * batch if caption_lengths is None else tuple(int(n) for n in caption_lengths)
        if len(lengths) != batch or not all(1 <= n <= tokens for n in lengths) or max(lengths) != tokens:
            raise ValueError(
                f"caption_lengths must give each of the {batch} rows 1..{tokens} tokens, the longest {tokens}; "
                f"got {list(lengths)}"
            )
        if len({padded_length(n) for n in lengths}) != 1:
            raise ValueError(
                f"caption lengths {list(lengths)} pad to different multiples of {SEQ_MULTIPLE}: such rows need "
                "separate forwards (this model takes no attention mask)"
            )
        return lengths

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        caption_lengths: Sequence[int] | None = None,
        patch_size: int = 2,
        f_patch_size: int = 1,
    ) -> torch.Tensor:
        """Predict the flow output for image latents.

        Args:
            hidden_states: ``(B, C, H, W)`` latents in the model dtype (H and W multiples of ``patch_size``).
            timestep: ``(B,)`` normalised time in [0, 1] -- ``(1000 - t) / 1000`` for scheduler timestep ``t``,
                as ``ZImagePipeline`` passes it; embedded as ``t_scale * timestep``.
            encoder_hidden_states: ``(B, T, cap_feat_dim)`` caption features (the text encoder's hidden states
                of each prompt's real tokens); rows shorter than ``T`` end in anything (zeros).
            caption_lengths: each row's real caption tokens (default: all ``T``). The rows must pad to the same
                multiple of 32, which makes their sequences alike: no attention mask is needed.
            patch_size, f_patch_size: which of the checkpoint's patch embeddings to use.

        Returns:
            ``(B, C, H, W)`` in the model dtype: the model's output, which the pipeline negates into the
            velocity the sampler steps with.
        """
        key = _patch_key(patch_size, f_patch_size)
        if key not in self.all_x_embedder:
            raise ValueError(f"patch size {key} is not one of this checkpoint's: {sorted(self.all_x_embedder)}")
        if f_patch_size != 1:
            raise ValueError("images have one frame: f_patch_size must be 1")
        batch, channels, height, width = hidden_states.shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {patch_size}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states must be (batch={batch}, tokens, features), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        caption_tokens = encoder_hidden_states.shape[1]
        lengths = self._caption_lengths(caption_lengths, batch, caption_tokens)
        rows, columns = height // patch_size, width // patch_size
        image_tokens = rows * columns
        image_length, caption_length = padded_length(image_tokens), padded_length(caption_tokens)
        self.rope.check_layout(caption_length, rows, columns)
        device, backend = hidden_states.device, self.attention_backend

        # (B, C, H, W) -> (B, rows * columns, patch * patch * C): each token's channels vary fastest.
        patches = (
            hidden_states.view(batch, channels, rows, patch_size, columns, patch_size)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch, image_tokens, patch_size * patch_size * channels)
        )
        adaln = self.t_embedder(timestep * self.config.t_scale).type_as(hidden_states)

        x = self.all_x_embedder[key](self._pad_with_last(patches, (image_tokens,) * batch, image_length))
        x = self._with_pad_token(x, (image_tokens,) * batch, self.x_pad_token)
        x_rope = self.rope.image_tables(caption_length, rows, columns, image_length - image_tokens, device)
        for block in self.noise_refiner:
            x = block(x, x_rope, adaln, backend)

        cap = self.cap_embedder(self._pad_with_last(encoder_hidden_states, lengths, caption_length))
        cap = self._with_pad_token(cap, lengths, self.cap_pad_token)
        cap_rope = self.rope.caption_tables(caption_length, device)
        for block in self.context_refiner:
            cap = block(cap, cap_rope, None, backend)

        unified = torch.cat((x, cap), dim=1)
        rope = (torch.cat((x_rope[0], cap_rope[0])), torch.cat((x_rope[1], cap_rope[1])))
        for block in self.layers:
            unified = block(unified, rope, adaln, backend)
        out = self.all_final_layer[key](unified, adaln)

        # The image's real tokens back to (B, C, H, W).
        out = out[:, :image_tokens].reshape(batch, rows, columns, patch_size, patch_size, channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)

    @staticmethod
    def tokens_per_sample(hidden_states: torch.Tensor) -> int:
        """Image tokens of one sample of the latents ``(B, C, H, W)`` (2x2 patches, before padding): what the
        engine's CFG-batching and CUDA-graph size rules count."""
        return int(hidden_states.shape[-2] // 2) * int(hidden_states.shape[-1] // 2)

    def fuse_projections(self) -> int:
        """Pack each attention's q/k/v and each feed-forward's w1/w3 into one GEMM (call after loading weights).

        State-dict keys and values are unchanged. Returns the number of packed groups (two per block)."""
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
