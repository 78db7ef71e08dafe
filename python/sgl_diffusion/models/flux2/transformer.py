"""Native FLUX.2 transformer (FLUX.2-dev, FLUX.2-klein): dual-stream blocks, then single-stream blocks.

Module attribute names mirror diffusers' ``Flux2Transformer2DModel`` exactly, so ``state_dict()`` keys are
the checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``. Operation
order (including where values change dtype) follows the reference, because the goal is numerical parity
with diffusers, not just "the same math".

What sets it apart from FLUX.1: no biases anywhere; the adaLN modulation is computed once per forward by
three model-level projections (``double_stream_modulation_img`` / ``_txt``, ``single_stream_modulation``)
that every block shares; SwiGLU feed-forwards; the single-stream block's q/k/v and MLP input are one
checkpoint projection (``to_qkv_mlp_proj``), its attention and MLP output one (``to_out``); 4-axis RoPE
(time, row, column, text position) with theta 2000; no pooled text embedding. FLUX.2-dev embeds the
guidance scale (``guidance_embeds``); klein does not.

Reference images (multi-image conditioning) are only more image tokens: their latents follow the generated
image's in ``hidden_states``, with their own position ids (time coordinate 10, 20, ...); the caller keeps
the generated image's share of the output.

Shapes used below: ``B`` batch, ``N`` image tokens, ``T`` text tokens, ``D`` inner dim
(``num_attention_heads * attention_head_dim``), ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.attention import attention, resolve_attention_backend
from ...layers.embeddings import TIME_PROJ_DIM, TimestepMLP, sinusoidal_embedding
from ...layers.fused import gated_residual, joint_qk_norm_rope, norm_modulate, qk_norm_rope
from ...layers.linear import (
    ProjectionFusion,
    fuse_model_projections,
    linear_split_accumulate,
    unfuse_model_projections,
)
from ...layers.norms import LayerNormNoAffine, RMSNorm
from ...layers.rotary import multi_axis_rope_tables

__all__ = ["Flux2Transformer2DModel", "Flux2TransformerConfig"]

#: Per-block modulation sets: the dual-stream blocks modulate attention and MLP separately (2 sets of
#: shift/scale/gate), the single-stream blocks run both in parallel from one set.
_DOUBLE_SETS = 2
_SINGLE_SETS = 1


@dataclass(frozen=True)
class Flux2TransformerConfig:
    """The fields of a FLUX.2 ``transformer/config.json`` (defaults = diffusers' = FLUX.2-dev's)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = TIME_PROJ_DIM
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = field(default=(32, 32, 32, 32))
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim="
                f"{self.attention_head_dim}: RoPE rotates every channel of a head"
            )
        if self.patch_size != 1:
            raise ValueError(f"patch_size must be 1 (latents arrive packed in 2x2 patches), got {self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Flux2TransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------


class _TimestepGuidanceEmbed(nn.Module):
    """``temb = mlp_t(sin(1000 t)) [+ mlp_g(sin(1000 g))]`` -> ``(B, D)`` (keys ``timestep_embedder``,
    ``guidance_embedder``; the latter only in guidance-distilled checkpoints)."""

    def __init__(self, channels: int, dim: int, with_guidance: bool) -> None:
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepMLP(channels, dim, bias=False)
        self.guidance_embedder = TimestepMLP(channels, dim, bias=False) if with_guidance else None

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        # Each float32 sinusoid is cast to its input's dtype (the activation dtype) before its MLP.
        emb = self.timestep_embedder(sinusoidal_embedding(timestep, self.channels).to(timestep.dtype))
        if guidance is None or self.guidance_embedder is None:
            return emb
        return emb + self.guidance_embedder(sinusoidal_embedding(guidance, self.channels).to(guidance.dtype))


class _Modulation(nn.Module):
    """``linear(SiLU(temb))``: ``sets`` groups of (shift, scale, gate), ``(B, 3 * sets * D)`` (key ``linear``)."""

    def __init__(self, dim: int, sets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim * 3 * sets, bias=False)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(temb))


@dataclass(frozen=True)
class _Mod:
    """One modulation set, each ``(B, 1, D)``, broadcast over the tokens."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def _split(params: torch.Tensor, sets: int) -> list[_Mod]:
    """``(B, 3 * sets * D)`` -> ``sets`` modulation sets, in the checkpoint's (shift, scale, gate) order."""
    chunks = params[:, None].chunk(3 * sets, dim=-1)
    return [_Mod(*chunks[3 * i : 3 * i + 3]) for i in range(sets)]


def _norm_modulate(norm: LayerNormNoAffine, x: torch.Tensor, mod: _Mod) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in the activation dtype, op by op, as the reference does."""
    return norm_modulate(x, mod.shift, mod.scale, norm="layer", eps=norm.eps, precision="input")


def _gated_residual(x: torch.Tensor, y: torch.Tensor, mod: _Mod) -> torch.Tensor:
    """``x + gate * y`` in the activation dtype."""
    return gated_residual(x, y, mod.gate, precision="input")


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(first half) * second half`` of the last dim (the gate and value halves of one projection)."""
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class _FeedForward(nn.Module):
    """SwiGLU MLP: ``linear_out(swiglu(linear_in(x)))`` (keys ``linear_in``, ``linear_out``; no biases)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(_swiglu(self.linear_in(x)))


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


RopeTables = tuple[torch.Tensor, torch.Tensor]


class _JointAttention(ProjectionFusion):
    """Both streams attend over ``[text, image]`` with per-stream projections and q/k RMS norms.

    Keys: ``to_q/to_k/to_v``, ``norm_q/norm_k``, ``to_out.0`` (image stream), ``add_{q,k,v}_proj``,
    ``norm_added_{q,k}``, ``to_add_out`` (text stream). Each stream's q/k/v read the same input: after
    :meth:`fuse_projections` they run as one GEMM per stream (groups ``qkv`` and ``add_qkv``).
    """

    _GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "qkv": ("to_q", "to_k", "to_v"),
        "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    }

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        # A ModuleList so the key is ``to_out.0`` (index 1 is dropout in the reference: no params).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        self.add_q_proj = nn.Linear(dim, inner, bias=False)
        self.add_k_proj = nn.Linear(dim, inner, bias=False)
        self.add_v_proj = nn.Linear(dim, inner, bias=False)
        self.to_add_out = nn.Linear(inner, dim, bias=False)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._GROUPS

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, rope: RopeTables, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the projected ``(img_out, txt_out)``; ``rope`` holds the tables of ``[text, image]``."""
        img_q, img_k, img_v = self.project(img, "qkv")
        txt_q, txt_k, txt_v = self.project(txt, "add_qkv")
        qk = {"head_dim": self.head_dim, "eps": self.eps}
        q = joint_qk_norm_rope(txt_q, img_q, self.norm_added_q.weight, self.norm_q.weight, *rope, **qk)
        k = joint_qk_norm_rope(txt_k, img_k, self.norm_added_k.weight, self.norm_k.weight, *rope, **qk)
        v = torch.cat((txt_v, img_v), dim=1).unflatten(-1, (-1, self.head_dim))
        out = attention(q, k, v, backend=backend)
        n_txt = txt.shape[1]
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        return self.to_out[0](img_out.contiguous()), self.to_add_out(txt_out.contiguous())


class _ParallelSelfAttention(nn.Module):
    """The single-stream block's attention and MLP, run side by side over ``[text, image]``.

    ``to_qkv_mlp_proj`` projects to ``[q | k | v | mlp gate | mlp value]`` in one GEMM; ``to_out`` reads
    ``[attention | swiglu(mlp)]``. On CUDA that second GEMM runs as two against column slices of its
    weight, accumulating into one output, so the concatenation is never materialised
    (:func:`sgl_diffusion.layers.linear.linear_split_accumulate`).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.inner = heads * head_dim
        self.mlp_hidden = mlp_hidden
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * self.inner + 2 * mlp_hidden, bias=False)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.to_out = nn.Linear(self.inner + mlp_hidden, dim, bias=False)

    def _norm_rope(self, x: torch.Tensor, norm: RMSNorm, rope: RopeTables) -> torch.Tensor:
        return qk_norm_rope(x.unflatten(-1, (-1, self.head_dim)), norm.weight, *rope, eps=norm.eps, norm_over="head")

    def forward(self, x: torch.Tensor, rope: RopeTables, backend: str) -> torch.Tensor:
        q, k, v, mlp = self.to_qkv_mlp_proj(x).split([self.inner, self.inner, self.inner, 2 * self.mlp_hidden], -1)
        q = self._norm_rope(q, self.norm_q, rope)
        k = self._norm_rope(k, self.norm_k, rope)
        attn = attention(q, k, v.unflatten(-1, (-1, self.head_dim)), backend=backend)
        return linear_split_accumulate((attn, _swiglu(mlp)), self.to_out.weight, None)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # Residual streams can exceed fp16 range on real checkpoints; clamp as the reference does.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class Flux2TransformerBlock(nn.Module):
    """Dual-stream block: separate weights per stream, joint attention; modulated by the model's shared
    ``double_stream_modulation_*`` vectors."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNormNoAffine(dim, eps)
        self.norm1_context = LayerNormNoAffine(dim, eps)
        self.attn = _JointAttention(dim, heads, head_dim, eps)
        self.norm2 = LayerNormNoAffine(dim, eps)
        self.ff = _FeedForward(dim, mlp_hidden)
        self.norm2_context = LayerNormNoAffine(dim, eps)
        self.ff_context = _FeedForward(dim, mlp_hidden)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        img_mod: torch.Tensor,
        txt_mod: torch.Tensor,
        rope: RopeTables,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_attn_mod, img_mlp_mod = _split(img_mod, _DOUBLE_SETS)
        txt_attn_mod, txt_mlp_mod = _split(txt_mod, _DOUBLE_SETS)
        img_attn, txt_attn = self.attn(
            _norm_modulate(self.norm1, img, img_attn_mod),
            _norm_modulate(self.norm1_context, txt, txt_attn_mod),
            rope,
            backend,
        )
        img = _gated_residual(img, img_attn, img_attn_mod)
        img = _gated_residual(img, self.ff(_norm_modulate(self.norm2, img, img_mlp_mod)), img_mlp_mod)
        txt = _gated_residual(txt, txt_attn, txt_attn_mod)
        txt = _gated_residual(txt, self.ff_context(_norm_modulate(self.norm2_context, txt, txt_mlp_mod)), txt_mlp_mod)
        return img, _clip_fp16(txt)


class Flux2SingleTransformerBlock(nn.Module):
    """Single-stream block over ``[text, image]``: attention and MLP in parallel, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNormNoAffine(dim, eps)
        self.attn = _ParallelSelfAttention(dim, heads, head_dim, mlp_hidden, eps)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope: RopeTables, backend: str) -> torch.Tensor:
        (params,) = _split(mod, _SINGLE_SETS)
        x = _gated_residual(x, self.attn(_norm_modulate(self.norm, x, params), rope, backend), params)
        return _clip_fp16(x)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class _OutputNorm(nn.Module):
    """Final adaptive LayerNorm: ``norm(x) * (1 + scale) + shift`` from ``linear(SiLU(temb))`` (key
    ``linear``). The chunk order is (scale, shift), reversed from the blocks' (shift, scale, gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = LayerNormNoAffine(dim, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # SiLU in temb's dtype, then cast to the activation dtype, as the reference orders it.
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return norm_modulate(x, shift[:, None], scale[:, None], norm="layer", eps=self.norm.eps, precision="input")


class Flux2Transformer2DModel(nn.Module):
    """FLUX.2 DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters (no buffers); RoPE tables are computed from
    the position ids in every forward.

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here so a
            bad name fails at load time. Can be changed later via :attr:`attention_backend`.
    """

    #: The compile units (:mod:`sgl_diffusion.runtime.compile`): dynamo shares one graph among a block
    #: class's instances, and the glue between blocks stays eager.
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, config: Flux2TransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim, eps = config.inner_dim, config.eps
        heads, head_dim, mlp_hidden = config.num_attention_heads, config.attention_head_dim, config.mlp_hidden_dim

        self.time_guidance_embed = _TimestepGuidanceEmbed(
            config.timestep_guidance_channels, dim, config.guidance_embeds
        )
        self.double_stream_modulation_img = _Modulation(dim, _DOUBLE_SETS)
        self.double_stream_modulation_txt = _Modulation(dim, _DOUBLE_SETS)
        self.single_stream_modulation = _Modulation(dim, _SINGLE_SETS)
        self.x_embedder = nn.Linear(config.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(
            [Flux2TransformerBlock(dim, heads, head_dim, mlp_hidden, eps) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                Flux2SingleTransformerBlock(dim, heads, head_dim, mlp_hidden, eps)
                for _ in range(config.num_single_layers)
            ]
        )
        self.norm_out = _OutputNorm(dim, eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.resolved_out_channels, bias=False)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | Flux2TransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> Flux2Transformer2DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, Flux2TransformerConfig) else Flux2TransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    @staticmethod
    def _as_batch_vector(value: torch.Tensor | float, batch: int, device: torch.device, name: str) -> torch.Tensor:
        """Accept a scalar, 0-d or ``(B,)`` tensor; return ``(B,)`` (per-sample values are allowed)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
        t = t.to(device).reshape(-1)
        if t.shape[0] == 1 and batch != 1:
            return t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"`{name}` has {t.shape[0]} values for a batch of {batch}")
        return t

    def _as_ids(self, ids: torch.Tensor, length: int, name: str) -> torch.Tensor:
        # Positions are shared by the whole batch; a (B, S, axes) tensor is accepted and its first row used,
        # as the reference does.
        if ids.ndim == 3:
            ids = ids[0]
        axes = len(self.config.axes_dims_rope)
        if ids.ndim != 2 or ids.shape != (length, axes):
            raise ValueError(f"`{name}` must be ({length}, {axes}) position ids, got {tuple(ids.shape)}")
        return ids

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for packed latents.

        Args:
            hidden_states: ``(B, N, in_channels)`` packed latents (2x2 latent patches, 128 channels): the
                generated image's tokens, then any reference images' tokens.
            encoder_hidden_states: ``(B, T, joint_attention_dim)`` stacked text-encoder hidden states.
            timestep: ``(B,)`` (or scalar) **sigma-scale time in [0, 1]** -- the scheduler timestep divided by
                1000, as the reference pipelines pass it. Cast to ``hidden_states``' dtype, then multiplied by
                1000 before the sinusoid (the cast first, as in the reference: it matters in bf16).
            img_ids: ``(N, 4)`` (or ``(B, N, 4)``) image token positions (time, row, column, 0).
            txt_ids: ``(T, 4)`` (or ``(B, T, 4)``) text token positions (0, 0, 0, index).
            guidance: ``(B,)`` (or scalar) raw embedded guidance scale (e.g. 4.0), cast and multiplied by 1000
                like the timestep. Used iff ``config.guidance_embeds`` (FLUX.2-dev), ignored otherwise, as the
                reference does.

        Returns:
            ``(B, N, patch_size**2 * out_channels)`` velocity for every image token (the caller keeps the
            generated image's part), in the model dtype.
        """
        batch, image_len = hidden_states.shape[:2]
        text_len = encoder_hidden_states.shape[1]
        dtype, device = hidden_states.dtype, hidden_states.device
        t = self._as_batch_vector(timestep, batch, device, "timestep").to(dtype) * 1000
        g: torch.Tensor | None = None
        if guidance is not None and self.config.guidance_embeds:
            g = self._as_batch_vector(guidance, batch, device, "guidance").to(dtype) * 1000
        elif self.config.guidance_embeds:
            raise ValueError("this FLUX.2 checkpoint embeds the guidance scale: `guidance` is required")
        temb = self.time_guidance_embed(t, g)
        img_mod = self.double_stream_modulation_img(temb)
        txt_mod = self.double_stream_modulation_txt(temb)
        single_mod = self.single_stream_modulation(temb)

        img = self.x_embedder(hidden_states)
        txt = self.context_embedder(encoder_hidden_states)

        ids = torch.cat((self._as_ids(txt_ids, text_len, "txt_ids"), self._as_ids(img_ids, image_len, "img_ids")))
        cos, sin = multi_axis_rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)
        rope = (cos.to(device), sin.to(device))
        backend = self.attention_backend

        for block in self.transformer_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, rope, backend)

        x = torch.cat((txt, img), dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, single_mod, rope, backend)
        return self.proj_out(self.norm_out(x[:, text_len:], temb))

    @staticmethod
    def tokens_per_sample(hidden_states: torch.Tensor) -> int:
        """Image tokens of one sample of the packed latents ``(B, N, C)`` (reference images included): what
        the engine's CFG-batching and CUDA-graph size rules count."""
        return int(hidden_states.shape[1])

    def fuse_projections(self) -> int:
        """Pack each dual-stream attention's q/k/v projections into one GEMM per stream (call after loading
        the weights; the single-stream blocks' are one checkpoint tensor already). State-dict keys and
        values are unchanged. Returns the number of packed groups (two per dual-stream block)."""
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
