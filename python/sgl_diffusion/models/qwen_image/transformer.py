"""Native Qwen-Image transformer (MMDiT: double-stream blocks only, joint attention over [text, image]).

Module attribute names mirror diffusers' ``QwenImageTransformer2DModel`` exactly, so ``state_dict()``
keys are the checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``.
Operation order (including where values change dtype) follows the reference, because the goal is
numerical parity with diffusers, not just "the same math".

One class covers Qwen-Image, Qwen-Image-2512 and the Edit models. The edit layout is only a longer
image sequence: the tokens of the image being generated, then the tokens of each reference image
(``img_shapes`` lists one (frames, rows, columns) piece per image; RoPE gives piece ``i`` frame ``i``).
Edit-2511 checkpoints set ``zero_cond_t``: reference-image tokens are then modulated as if at timestep
0 (they are clean), the generated image's tokens at the real timestep.

Shapes used below: ``B`` batch, ``N`` image tokens (all pieces), ``T`` text tokens, ``D`` inner dim
(``num_attention_heads * attention_head_dim``), ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.attention import attention, resolve_attention_backend
from ...layers.fused import gated_residual, norm_modulate, qk_norm_rope
from ...layers.linear import (
    GeluTanhFeedForward,
    ProjectionFusion,
    fuse_model_projections,
    unfuse_model_projections,
)
from ...layers.norms import LayerNormNoAffine, RMSNorm
from .rope import ImagePiece, QwenImageRope

__all__ = ["QwenImageTransformer2DModel", "QwenImageTransformerConfig", "normalize_img_shapes"]

# Sinusoid width fed to the timestep MLP (fixed by the architecture, not in config.json).
_TIME_PROJ_DIM = 256
_EPS = 1e-6
# The 6-way block modulation: (shift, scale, gate) before attention, then before the MLP.
_BLOCK_MOD_CHUNKS = 6


@dataclass(frozen=True)
class QwenImageTransformerConfig:
    """The fields of a Qwen-Image ``transformer/config.json`` (defaults = diffusers' = Qwen-Image's)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = field(default=(16, 56, 56))
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim="
                f"{self.attention_head_dim}: RoPE rotates every channel of a head"
            )
        if self.guidance_embeds:
            # No guidance-distilled Qwen-Image exists; the flag adds no weights, and diffusers 0.42.1's
            # forward fails when the pipeline then passes a guidance value. Refuse rather than ignore it.
            raise ValueError("guidance_embeds=True is not supported: Qwen-Image has no guidance embedding")
        if self.use_additional_t_cond or self.use_layer3d_rope:
            raise ValueError(
                "use_additional_t_cond / use_layer3d_rope (Qwen-Image-Layered) are not supported yet; "
                "supported: Qwen-Image, Qwen-Image-2512, Qwen-Image-Edit (incl. 2509, 2511 with zero_cond_t)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> QwenImageTransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


def normalize_img_shapes(img_shapes: Sequence[Any], batch: int) -> tuple[ImagePiece, ...]:
    """The token layout shared by every sample, from ``img_shapes`` in the reference's format.

    ``img_shapes`` has one entry per sample (or one for the whole batch); an entry is a ``(frames, rows,
    columns)`` triple (text-to-image) or a sequence of them (generated image, then reference images).
    The reference computes RoPE from the first sample's entry only; here every sample must agree, since
    samples of one batch share one token sequence length anyway and a silent mismatch would mis-rotate.
    """
    if len(img_shapes) not in (1, batch):
        raise ValueError(f"img_shapes has {len(img_shapes)} entries for a batch of {batch} (need 1 or {batch})")

    def pieces(entry: Any) -> tuple[ImagePiece, ...]:
        items = [entry] if isinstance(entry[0], numbers.Integral) else list(entry)
        out: list[ImagePiece] = []
        for item in items:
            triple = tuple(int(v) for v in item)
            if len(triple) != 3 or min(triple) < 1:
                raise ValueError(f"an img_shapes piece is (frames, rows, columns) >= 1, got {item!r}")
            out.append(triple)  # type: ignore[arg-type]
        if not out:
            raise ValueError("an img_shapes entry has no pieces")
        return tuple(out)

    layouts = [pieces(entry) for entry in img_shapes]
    if any(layout != layouts[0] for layout in layouts[1:]):
        raise ValueError(f"every sample of a batch needs the same image layout, got {layouts}")
    return layouts[0]


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------


def timestep_sinusoid(timestep: torch.Tensor, dim: int = _TIME_PROJ_DIM, scale: float = 1000.0) -> torch.Tensor:
    """``(N,) -> (N, dim)`` float32 ``[cos | sin]`` embedding of ``scale * t`` (``t`` a sigma in [0, 1]).

    Frequencies ``10000 ** (-i / (dim/2))``. The scale multiplies the angle *after* ``t * freq`` (not
    ``t`` before it), as the reference does; in float32 the two orders differ in the last bit.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(exponent / half)
    angles = scale * (timestep[:, None].float() * freqs[None, :])
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)


class _TimestepEmbedder(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoid (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    """``temb = mlp(sinusoid(1000 t))`` -> ``(B, D)`` (key ``timestep_embedder``; no text pooling here)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = _TimestepEmbedder(_TIME_PROJ_DIM, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The sinusoid is float32; it is cast to the activation dtype before the MLP.
        return self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))


def _modulation(dim: int, chunks: int) -> nn.Sequential:
    """``Linear(SiLU(temb))`` with the checkpoint's key ``<name>.1`` (index 0 is the parameter-free SiLU)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


@dataclass(frozen=True)
class _Modulation:
    """Shift/scale/gate vectors, each ``(B, 1, D)`` (per sample) or ``(B, N, D)`` (per token, zero_cond_t)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def _per_sample(params: torch.Tensor) -> tuple[_Modulation, _Modulation]:
    """``(B, 6D)`` block modulation -> (before attention, before MLP), broadcast over the tokens."""
    s1, c1, g1, s2, c2, g2 = (p[:, None] for p in params.chunk(_BLOCK_MOD_CHUNKS, dim=-1))
    return _Modulation(s1, c1, g1), _Modulation(s2, c2, g2)


def _per_token(params: torch.Tensor, generated_tokens: int, total_tokens: int) -> tuple[_Modulation, _Modulation]:
    """zero_cond_t: ``(2B, 6D)`` = [real timestep rows; timestep-0 rows] -> per-token ``(B, N, D)`` vectors:
    the first ``generated_tokens`` take the real-timestep values, the reference-image tokens the others.

    A selection, no arithmetic: values equal the reference's ``torch.where`` on a per-token index.
    """
    batch = params.shape[0] // 2
    reference_tokens = total_tokens - generated_tokens
    now, clean = params[:batch], params[batch:]

    def spread(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            (
                a[:, None].expand(-1, generated_tokens, -1),
                b[:, None].expand(-1, reference_tokens, -1),
            ),
            dim=1,
        )

    parts = [
        spread(a, b)
        for a, b in zip(now.chunk(_BLOCK_MOD_CHUNKS, dim=-1), clean.chunk(_BLOCK_MOD_CHUNKS, dim=-1), strict=True)
    ]
    return _Modulation(*parts[:3]), _Modulation(*parts[3:])


class _OutputNorm(nn.Module):
    """Final adaptive LayerNorm: ``norm(x) * (1 + scale) + shift`` from ``linear(SiLU(temb))`` (key ``linear``).

    The chunk order is (scale, shift) -- reversed from the blocks' (shift, scale, gate).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = LayerNormNoAffine(dim, _EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # SiLU in temb's dtype, then cast to the activation dtype, as the reference orders it.
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return norm_modulate(x, shift[:, None], scale[:, None], norm="layer", eps=self.norm.eps, precision="input")


def _norm_modulate(norm: LayerNormNoAffine, x: torch.Tensor, mod: _Modulation) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in the activation dtype, op by op, as the reference does."""
    return norm_modulate(x, mod.shift, mod.scale, norm="layer", eps=norm.eps, precision="input")


def _gated_residual(x: torch.Tensor, y: torch.Tensor, mod: _Modulation) -> torch.Tensor:
    """``x + gate * y`` in the activation dtype."""
    return gated_residual(x, y, mod.gate, precision="input")


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

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_q = RMSNorm(head_dim, _EPS)
        self.norm_k = RMSNorm(head_dim, _EPS)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        # A ModuleList so the key is ``to_out.0`` (index 1 is dropout in the reference: no params).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.norm_added_q = RMSNorm(head_dim, _EPS)
        self.norm_added_k = RMSNorm(head_dim, _EPS)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.to_add_out = nn.Linear(inner, dim)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._GROUPS

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def _joint_norm_rope(
        self,
        img_x: torch.Tensor,
        txt_x: torch.Tensor,
        img_norm: RMSNorm,
        txt_norm: RMSNorm,
        img_rope: RopeTables,
        txt_rope: RopeTables,
    ) -> torch.Tensor:
        """``cat(rope(txt_norm(txt)), rope(img_norm(img)))`` for q or k, written straight into one buffer.

        Each stream has its own norm weights and RoPE rows; writing each into its slice of the joint
        tensor saves the concatenation's copy (one fused kernel per stream on CUDA).
        """
        n_txt = txt_x.shape[1]
        batch, n_img, inner = img_x.shape
        joint = img_x.new_empty(batch, n_txt + n_img, inner // self.head_dim, self.head_dim)
        qk_norm_rope(
            self._heads(txt_x), txt_norm.weight, *txt_rope, eps=txt_norm.eps, norm_over="head", out=joint[:, :n_txt]
        )
        qk_norm_rope(
            self._heads(img_x), img_norm.weight, *img_rope, eps=img_norm.eps, norm_over="head", out=joint[:, n_txt:]
        )
        return joint

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        img_rope: RopeTables,
        txt_rope: RopeTables,
        key_mask: torch.Tensor | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the projected ``(img_out, txt_out)``; ``key_mask`` is ``(B, T + N)`` bool or None."""
        img_q, img_k, img_v = self.project(img, "qkv")
        txt_q, txt_k, txt_v = self.project(txt, "add_qkv")
        q = self._joint_norm_rope(img_q, txt_q, self.norm_q, self.norm_added_q, img_rope, txt_rope)
        k = self._joint_norm_rope(img_k, txt_k, self.norm_k, self.norm_added_k, img_rope, txt_rope)
        v = torch.cat((self._heads(txt_v), self._heads(img_v)), dim=1)
        out = attention(q, k, v, backend=backend, attn_mask=key_mask)
        n_txt = txt.shape[1]
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        return self.to_out[0](img_out.contiguous()), self.to_add_out(txt_out.contiguous())


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # Residual streams can exceed fp16 range on real checkpoints; clamp as the reference does.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


@dataclass(frozen=True)
class _BlockInputs:
    """What every block reads besides the two streams (computed once per forward)."""

    temb: torch.Tensor  # (B, D), or (2B, D) with zero_cond_t: [real timestep; timestep 0]
    img_rope: RopeTables
    txt_rope: RopeTables
    key_mask: torch.Tensor | None
    # zero_cond_t: how many leading image tokens belong to the generated image (the rest are references).
    generated_tokens: int | None
    backend: str


class QwenImageTransformerBlock(nn.Module):
    """Double-stream block: separate weights per stream, joint attention, adaLN-zero modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.img_mod = _modulation(dim, _BLOCK_MOD_CHUNKS)
        self.img_norm1 = LayerNormNoAffine(dim, _EPS)
        self.attn = _JointAttention(dim, heads, head_dim)
        self.img_norm2 = LayerNormNoAffine(dim, _EPS)
        self.img_mlp = GeluTanhFeedForward(dim)
        self.txt_mod = _modulation(dim, _BLOCK_MOD_CHUNKS)
        self.txt_norm1 = LayerNormNoAffine(dim, _EPS)
        self.txt_norm2 = LayerNormNoAffine(dim, _EPS)
        self.txt_mlp = GeluTanhFeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, inputs: _BlockInputs) -> tuple[torch.Tensor, torch.Tensor]:
        img_params = self.img_mod(inputs.temb)
        if inputs.generated_tokens is None:
            img_attn_mod, img_mlp_mod = _per_sample(img_params)
            txt_temb = inputs.temb
        else:
            img_attn_mod, img_mlp_mod = _per_token(img_params, inputs.generated_tokens, img.shape[1])
            # The text stream always sees the real timestep.
            txt_temb = inputs.temb[: img.shape[0]]
        txt_attn_mod, txt_mlp_mod = _per_sample(self.txt_mod(txt_temb))

        img_attn, txt_attn = self.attn(
            _norm_modulate(self.img_norm1, img, img_attn_mod),
            _norm_modulate(self.txt_norm1, txt, txt_attn_mod),
            inputs.img_rope,
            inputs.txt_rope,
            inputs.key_mask,
            inputs.backend,
        )
        img = _gated_residual(img, img_attn, img_attn_mod)
        txt = _gated_residual(txt, txt_attn, txt_attn_mod)

        img = _gated_residual(img, self.img_mlp(_norm_modulate(self.img_norm2, img, img_mlp_mod)), img_mlp_mod)
        txt = _gated_residual(txt, self.txt_mlp(_norm_modulate(self.txt_norm2, txt, txt_mlp_mod)), txt_mlp_mod)
        return _clip_fp16(img), _clip_fp16(txt)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class QwenImageTransformer2DModel(nn.Module):
    """Qwen-Image DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters (no buffers); RoPE tables are built per
    forward from the token layout (:class:`~sgl_diffusion.models.qwen_image.rope.QwenImageRope`).

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here
            so a bad name fails at load time. Can be changed later via :attr:`attention_backend`.
    """

    #: The compile unit (:mod:`sgl_diffusion.runtime.compile`): the double-stream blocks.
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def __init__(self, config: QwenImageTransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim

        self.rope = QwenImageRope(config.axes_dims_rope)
        self.time_text_embed = _TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(config.joint_attention_dim, _EPS)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)]
        )
        self.norm_out = _OutputNorm(dim)
        self.proj_out = nn.Linear(dim, config.patch_size * config.patch_size * config.resolved_out_channels)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | QwenImageTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> QwenImageTransformer2DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, QwenImageTransformerConfig) else QwenImageTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    @staticmethod
    def _as_batch_vector(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """Accept a scalar, 0-d or ``(B,)`` timestep; return ``(B,)`` (per-sample values are allowed)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
        t = t.to(device).reshape(-1)
        if t.shape[0] == 1 and batch != 1:
            return t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"`timestep` has {t.shape[0]} values for a batch of {batch}")
        return t

    @staticmethod
    def _key_mask(text_mask: torch.Tensor | None, batch: int, text_len: int, image_len: int) -> torch.Tensor | None:
        """``(B, T + N)`` bool keys mask over ``[text, image]`` from the text padding mask (None: all valid)."""
        if text_mask is None:
            return None
        if tuple(text_mask.shape) != (batch, text_len):
            raise ValueError(
                f"encoder_hidden_states_mask must be (batch, text_len) = ({batch}, {text_len}), "
                f"got {tuple(text_mask.shape)}"
            )
        image_keys = torch.ones(batch, image_len, dtype=torch.bool, device=text_mask.device)
        return torch.cat((text_mask.to(torch.bool), image_keys), dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        img_shapes: Sequence[Any],
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for packed latents.

        Args:
            hidden_states: ``(B, N, in_channels)`` packed latents (2x2 latent patches, 64 channels), the
                generated image's tokens first, then any reference images' tokens (edit layout).
            encoder_hidden_states: ``(B, T, joint_attention_dim)`` Qwen2.5-VL hidden states, padded to the
                batch's longest prompt.
            timestep: ``(B,)`` (or scalar) **sigma-scale time in [0, 1]** -- the scheduler timestep divided
                by 1000, as ``QwenImagePipeline`` passes it. Cast to the model dtype first (as the reference
                does), embedded as ``1000 * t``.
            img_shapes: the image token layout, in the reference's format: one entry per sample (or one for
                all), each a ``(frames, rows, columns)`` triple or a list of them (generated image first, then
                reference images). Every sample must have the same layout.
            encoder_hidden_states_mask: ``(B, T)`` with 1/True for real tokens and 0/False for padding (any
                pattern), or None when no sample has padding.

        Returns:
            ``(B, N, patch_size**2 * out_channels)`` velocity for every image token (the caller keeps the
            generated image's part), in the model dtype.
        """
        batch, image_len = hidden_states.shape[:2]
        text_len = encoder_hidden_states.shape[1]
        pieces = normalize_img_shapes(img_shapes, batch)
        layout_len = sum(f * h * w for f, h, w in pieces)
        if layout_len != image_len:
            raise ValueError(
                f"img_shapes {list(pieces)} describe {layout_len} image tokens, hidden_states has {image_len}"
            )

        img = self.img_in(hidden_states)
        dtype, device = img.dtype, img.device
        t = self._as_batch_vector(timestep, batch, device).to(dtype)
        generated_tokens: int | None = None
        if self.config.zero_cond_t:
            # Reference-image tokens are clean: they get the modulation of timestep 0.
            t = torch.cat((t, t * 0))
            frames, height, width = pieces[0]
            generated_tokens = frames * height * width

        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_text_embed(t, dtype)
        inputs = _BlockInputs(
            temb=temb,
            img_rope=self.rope.image_tables(pieces, device),
            txt_rope=self.rope.text_tables(pieces, text_len, device),
            key_mask=self._key_mask(encoder_hidden_states_mask, batch, text_len, image_len),
            generated_tokens=generated_tokens,
            backend=self.attention_backend,
        )
        for block in self.transformer_blocks:
            img, txt = block(img, txt, inputs)

        # With zero_cond_t the output is modulated at the real timestep (the first B rows of temb).
        return self.proj_out(self.norm_out(img, temb[:batch]))

    @staticmethod
    def tokens_per_sample(hidden_states: torch.Tensor) -> int:
        """Image tokens of one sample of the packed latents ``(B, N, C)`` (all pieces): what the engine's
        CFG-batching and CUDA-graph size rules count."""
        return int(hidden_states.shape[1])

    def fuse_projections(self) -> int:
        """Pack each attention's q/k/v projections into one GEMM per stream (call after loading weights).

        State-dict keys and values are unchanged (the Linears keep views of the packed weights). Returns
        the number of packed groups (two per block).
        """
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
