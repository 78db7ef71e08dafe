"""Native FLUX.1 transformer (MMDiT: dual-stream blocks, then single-stream blocks).

Module attribute names mirror diffusers' ``FluxTransformer2DModel`` exactly, so ``state_dict()`` keys
are the checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``.
Operation order (including where values are cast between dtypes) follows the reference too, because
the goal is numerical parity with diffusers, not just "the same math".

Shapes used below: ``B`` batch, ``L`` image tokens, ``T`` text tokens, ``D`` inner dim
(``num_attention_heads * attention_head_dim``), ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import logging
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
    GeluTanhFeedForward,
    ProjectionFusion,
    fuse_model_projections,
    linear_gelu_tanh,
    linear_split_accumulate,
    unfuse_model_projections,
)
from ...layers.norms import LayerNormNoAffine, RMSNorm
from ...layers.rotary import multi_axis_rope_tables

logger = logging.getLogger(__name__)

__all__ = ["FluxTransformer2DModel", "FluxTransformerConfig"]

_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class FluxTransformerConfig:
    """The fields of a FLUX.1 ``transformer/config.json`` (defaults = diffusers' defaults = FLUX.1-dev)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = field(default=(16, 56, 56))

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim="
                f"{self.attention_head_dim}: RoPE rotates every channel of a head"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> FluxTransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


# --------------------------------------------------------------------------------------------------
# Conditioning embeddings
# --------------------------------------------------------------------------------------------------


class _TimeTextEmbed(nn.Module):
    """``temb = mlp_t(sin(t)) [+ mlp_g(sin(g))] + mlp_text(pooled)`` -> ``(B, D)``.

    ``guidance_embedder`` exists only for guidance-distilled checkpoints (FLUX.1-dev), matching
    which keys the checkpoint has.
    """

    def __init__(self, dim: int, pooled_dim: int, with_guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = TimestepMLP(TIME_PROJ_DIM, dim)
        if with_guidance:
            self.guidance_embedder = TimestepMLP(TIME_PROJ_DIM, dim)
        self.text_embedder = TimestepMLP(pooled_dim, dim)
        self.with_guidance = with_guidance

    def forward(
        self,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        # The sinusoid is float32; it is cast to the activation dtype before the MLP.
        emb = self.timestep_embedder(sinusoidal_embedding(timestep).to(pooled.dtype))
        if self.with_guidance:
            if guidance is None:
                raise ValueError("this FLUX checkpoint is guidance-distilled: `guidance` is required")
            emb = emb + self.guidance_embedder(sinusoidal_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class _AdaLNModulation(nn.Module):
    """``Linear(SiLU(temb))`` split into ``n_chunks`` per-sample vectors (key ``linear``).

    The chunk order is the checkpoint's: for the 6-way block modulation it is
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); 3-way is (shift, scale, gate);
    the final 2-way ``norm_out`` is (scale, shift) -- note the reversed order there.
    """

    def __init__(self, dim: int, n_chunks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, n_chunks * dim)
        self.n_chunks = n_chunks

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n_chunks, dim=1)


def _norm_modulate(norm: LayerNormNoAffine, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` with per-sample ``(B, D)`` scale/shift broadcast over tokens.

    The torch path evaluates it in the activation dtype, op by op, as the reference does; the fused
    CUDA kernel (:mod:`sgl_diffusion.layers.fused`) computes in float32 and rounds once.
    """
    return norm_modulate(x, shift[:, None], scale[:, None], norm="layer", eps=norm.eps, precision="input")


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` with a per-sample ``(B, D)`` gate (activation dtype; float32 when fused)."""
    return gated_residual(x, y, gate[:, None], precision="input")


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


RopeTables = tuple[torch.Tensor, torch.Tensor]


class _FluxAttention(ProjectionFusion):
    """QK-normed multi-head attention; with ``joint=True`` also holds the text-stream projections.

    Keys: ``to_q/to_k/to_v``, ``norm_q/norm_k``, and for joint attention ``add_{q,k,v}_proj``,
    ``norm_added_{q,k}``, ``to_out.0`` and ``to_add_out``. Single-stream blocks have no output
    projection here (their ``proj_out`` fuses attention and MLP).

    The q/k/v projections of a stream read the same input: after :meth:`fuse_projections` they run as
    one GEMM (group ``qkv`` for the image / joint stream, ``add_qkv`` for the text stream).
    """

    _SINGLE_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv": ("to_q", "to_k", "to_v")}
    _JOINT_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        **_SINGLE_GROUPS,
        "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    }

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.joint = joint
        inner = heads * head_dim
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self._qk = {"head_dim": head_dim, "eps": eps}
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if joint:
            # A ModuleList so the key is ``to_out.0`` (index 1 is dropout in the reference: no params).
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
            self.norm_added_q = RMSNorm(head_dim, eps)
            self.norm_added_k = RMSNorm(head_dim, eps)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._JOINT_GROUPS if self.joint else self._SINGLE_GROUPS

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def _norm_rope(
        self, x: torch.Tensor, norm: RMSNorm, rope: RopeTables, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-head RMS ``norm`` of a q/k projection, then RoPE (one fused kernel on CUDA)."""
        return qk_norm_rope(self._heads(x), norm.weight, *rope, eps=norm.eps, norm_over="head", out=out)

    def forward_single(self, x: torch.Tensor, rope: RopeTables, backend: str) -> torch.Tensor:
        """Self-attention over the already-concatenated ``[text, image]`` sequence -> ``(B, S, D)``."""
        q, k, v = self.project(x, "qkv")
        q = self._norm_rope(q, self.norm_q, rope)
        k = self._norm_rope(k, self.norm_k, rope)
        return attention(q, k, self._heads(v), backend=backend)

    def forward_joint(
        self, img: torch.Tensor, txt: torch.Tensor, rope: RopeTables, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams attend over ``[text, image]`` jointly; returns projected (img_out, txt_out)."""
        # Text first: RoPE tables are built for ids ordered [txt_ids, img_ids]. Each stream has its own
        # q/k norm weights.
        img_q, img_k, img_v = self.project(img, "qkv")
        txt_q, txt_k, txt_v = self.project(txt, "add_qkv")
        # Each stream has its own q/k norm weights (all with the same eps).
        q = joint_qk_norm_rope(txt_q, img_q, self.norm_added_q.weight, self.norm_q.weight, *rope, **self._qk)
        k = joint_qk_norm_rope(txt_k, img_k, self.norm_added_k.weight, self.norm_k.weight, *rope, **self._qk)
        v = torch.cat((self._heads(txt_v), self._heads(img_v)), dim=1)
        out = attention(q, k, v, backend=backend)
        n_txt = txt.shape[1]
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        return self.to_out[0](img_out.contiguous()), self.to_add_out(txt_out.contiguous())


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # Residual streams can exceed fp16 range on real checkpoints; clamp as the reference does.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Dual-stream block: separate weights per stream, joint attention, adaLN-zero modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = _AdaLNModulation(dim, 6)
        self.norm1_context = _AdaLNModulation(dim, 6)
        self.attn = _FluxAttention(dim, heads, head_dim, joint=True)
        self.ff = GeluTanhFeedForward(dim)
        self.ff_context = GeluTanhFeedForward(dim)
        self.norm = LayerNormNoAffine(dim, eps=1e-6)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rope: RopeTables,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(temb)
        c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(temb)

        img_attn, txt_attn = self.attn.forward_joint(
            _norm_modulate(self.norm, img, shift_a, scale_a),
            _norm_modulate(self.norm, txt, c_shift_a, c_scale_a),
            rope,
            backend,
        )

        img = _gated_residual(img, img_attn, gate_a)
        img = _gated_residual(img, self.ff(_norm_modulate(self.norm, img, shift_m, scale_m)), gate_m)

        txt = _gated_residual(txt, txt_attn, c_gate_a)
        txt = _gated_residual(txt, self.ff_context(_norm_modulate(self.norm, txt, c_shift_m, c_scale_m)), c_gate_m)
        return img, _clip_fp16(txt)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over ``[text, image]``: attention and MLP in parallel, one fused output.

    On CUDA the MLP's GELU runs in its GEMM's epilogue, and ``proj_out(cat(attn, mlp))`` runs as two
    GEMMs against column slices of ``proj_out.weight`` accumulating into one output, so the
    ``(tokens, dim + mlp_dim)`` concatenation is never materialised (:mod:`sgl_diffusion.layers.linear`).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = _AdaLNModulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)
        self.attn = _FluxAttention(dim, heads, head_dim, joint=False)
        self.layer_norm = LayerNormNoAffine(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: RopeTables, backend: str) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)
        h = _norm_modulate(self.layer_norm, x, shift, scale)
        mlp = linear_gelu_tanh(h, self.proj_mlp.weight, self.proj_mlp.bias)
        attn = self.attn.forward_single(h, rope, backend)
        out = linear_split_accumulate((attn, mlp), self.proj_out.weight, self.proj_out.bias)
        x = _gated_residual(x, out, gate)
        return _clip_fp16(x)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class FluxTransformer2DModel(nn.Module):
    """FLUX.1 DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters (no buffers); RoPE tables are computed
    from the ids in every forward.

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here
            so a bad name fails at load time. Can be changed later via :attr:`attention_backend`.
    """

    #: The block lists `--enable-torch-compile` compiles block by block: dynamo shares one graph among a
    #: block class's instances, and the glue between blocks stays eager.
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")

    def __init__(
        self,
        config: FluxTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        patch_dim = config.patch_size * config.patch_size

        self.time_text_embed = _TimeTextEmbed(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)]
        )
        self.norm_out = _AdaLNModulation(dim, 2)
        self.final_norm = LayerNormNoAffine(dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_dim * config.resolved_out_channels)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | FluxTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> FluxTransformer2DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, FluxTransformerConfig) else FluxTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    @staticmethod
    def _as_batch_vector(value: torch.Tensor | float, batch: int, device: torch.device, name: str) -> torch.Tensor:
        """Accept a scalar, 0-d or ``(B,)`` tensor; return ``(B,)`` (per-sample values are allowed)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
        t = t.to(device)
        if t.ndim == 0:
            return t.expand(batch)
        t = t.reshape(-1)
        if t.shape[0] == 1 and batch != 1:
            return t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"`{name}` has {t.shape[0]} values for a batch of {batch}")
        return t

    @staticmethod
    def _as_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
        # Positions are shared by the whole batch (same resolution, same text length); a legacy
        # (B, S, 3) tensor is accepted and its first row used, as the reference pipeline does.
        if ids.ndim == 3:
            return ids[0]
        if ids.ndim != 2:
            raise ValueError(f"`{name}` must be (seq, n_axes), got {tuple(ids.shape)}")
        return ids

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor | float,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for packed latents.

        Args:
            hidden_states: ``(B, L, in_channels)`` packed latents (2x2 latent patches, 64 ch for FLUX.1).
            encoder_hidden_states: ``(B, T, joint_attention_dim)`` T5 hidden states.
            pooled_projections: ``(B, pooled_projection_dim)`` CLIP pooled output.
            timestep: ``(B,)`` (or scalar) **sigma-scale time in [0, 1]**, i.e. the scheduler timestep
                divided by 1000 -- exactly what ``FluxPipeline`` passes (``t / 1000``). It is cast to
                the model dtype and multiplied by 1000 here before the sinusoidal embedding (the cast
                happens before the multiply, as in the reference, which matters in bf16).
            img_ids: ``(L, 3)`` image token positions ``(0, row, col)``.
            txt_ids: ``(T, 3)`` text token positions (all zeros for FLUX.1).
            guidance: ``(B,)`` (or scalar) **raw guidance scale** (e.g. 3.5, NOT divided by 1000; the
                pipeline passes it as-is), cast to the model dtype and multiplied by 1000 here.
                Required iff ``config.guidance_embeds``; ignored otherwise.

        Returns:
            ``(B, L, patch_size**2 * out_channels)`` velocity prediction in the model dtype.

        Every sample is processed independently (per-sample timestep/guidance only enter through
        the ``(B, D)`` conditioning vector), so batching requests does not change any row's result
        beyond floating-point reduction-order effects.
        """
        batch = hidden_states.shape[0]
        img = self.x_embedder(hidden_states)
        dtype, device = img.dtype, img.device

        t = self._as_batch_vector(timestep, batch, device, "timestep").to(dtype) * 1000
        g: torch.Tensor | None = None
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX checkpoint is guidance-distilled: `guidance` is required")
            g = self._as_batch_vector(guidance, batch, device, "guidance").to(dtype) * 1000
        temb = self.time_text_embed(t, g, pooled_projections)
        txt = self.context_embedder(encoder_hidden_states)

        ids = torch.cat((self._as_ids(txt_ids, "txt_ids"), self._as_ids(img_ids, "img_ids")), dim=0)
        cos, sin = multi_axis_rope_tables(ids, self.config.axes_dims_rope, _ROPE_THETA)
        rope = (cos.to(device), sin.to(device))
        backend = self.attention_backend

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope, backend)

        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope, backend)
        img = x[:, n_txt:]

        # The final modulation is cast to the activation dtype first (temb may be float32 upstream).
        scale, shift = self.norm_out.linear(F.silu(temb).to(img.dtype)).chunk(2, dim=1)
        img = _norm_modulate(self.final_norm, img, shift, scale)
        return self.proj_out(img)

    @staticmethod
    def tokens_per_sample(hidden_states: torch.Tensor) -> int:
        """Image tokens of one sample of the packed latents ``(B, L, C)``."""
        return int(hidden_states.shape[1])

    def fuse_projections(self) -> int:
        """Pack each attention's q/k/v projections into one GEMM (call after the weights are loaded).

        State-dict keys and values are unchanged (the Linears keep views of the packed weights). Returns
        the number of packed groups (two per dual-stream block, one per single-stream block).
        """
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
