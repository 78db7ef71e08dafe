"""Native GLM-Image DiT (single-stream blocks: joint attention over [glyph text, image] with shared weights).

Module attribute names mirror diffusers' ``GlmImageTransformer2DModel`` exactly, so ``state_dict()`` keys are
the checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``. Operation order
(including where values change dtype) follows the reference, because the goal is numerical parity with
diffusers, not just "the same math".

What the DiT reads besides the noisy latents:

* the glyph embeddings (ByT5 hidden states of the prompt's quoted text) as the text stream;
* the prior's image tokens (one codebook id per DiT token), embedded and added to the image tokens; the
  unconditional branch of classifier-free guidance zeroes them (``prior_token_drop``);
* the timestep and SDXL-style size conditions (target size, crop corner) in one embedding.

Image editing (condition images): each block's keys and values of the condition images' tokens, computed
once at timestep 0 (:meth:`GlmImageTransformer2DModel.condition_kv`), are put in front of the generated
image's keys and values in the conditional branch (diffusers' ``GlmImageKVCache`` in "write" then "read"
mode).

Shapes used below: ``B`` batch, ``N`` image tokens, ``T`` text tokens, ``D`` inner dim (``num_attention_heads *
attention_head_dim``), ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.attention import attention, resolve_attention_backend
from ...layers.fused import gated_residual, norm_modulate
from ...layers.linear import GeluTanhFeedForward, ProjectionFusion, fuse_model_projections, unfuse_model_projections
from ...layers.norms import LayerNormNoAffine

__all__ = ["GlmImageTransformer2DModel", "GlmImageTransformerConfig", "LayerKV"]

_EPS = 1e-5
_ROPE_THETA = 10000.0
# The 12-way block modulation: (shift, c_shift, scale, c_scale, gate, c_gate) before attention, then before
# the MLP; ``c_`` values modulate the text stream.
_BLOCK_MOD_CHUNKS = 12

#: One block's keys and values of condition-image tokens, each ``(B or 1, Nc, H, Dh)``.
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GlmImageTransformerConfig:
    """The fields of a GLM-Image ``transformer/config.json`` (defaults = diffusers' = GLM-Image's)."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 40
    num_attention_heads: int = 64
    text_embed_dim: int = 1472
    time_embed_dim: int = 512
    condition_dim: int = 256
    prior_vq_quantizer_codebook_size: int = 16384

    def __post_init__(self) -> None:
        if self.attention_head_dim % 4 != 0:
            raise ValueError(
                f"attention_head_dim must be a multiple of 4 (RoPE rotates height and width pairs), got "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> GlmImageTransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping keys (``_class_name``...) are ignored."""
        return config_from_dict(cls, cfg)


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``(N,) -> (N, dim)`` float32 ``[cos | sin]`` of ``values * 10000 ** (-i / (dim/2))`` (diffusers'
    ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``, computed in the same order)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(exponent / half)
    angles = values[:, None].float() * freqs[None, :]
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1)


class _MLP(nn.Module):
    """Linear -> SiLU -> Linear (keys ``linear_1``, ``linear_2``): diffusers' ``TimestepEmbedding`` and
    ``PixArtAlphaTextProjection(act_fn="silu")`` alike."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeConditionEmbed(nn.Module):
    """``silu(mlp(sinusoid(t)) + mlp([sinusoid(crop) | sinusoid(target size)]))`` -> ``(B, time_embed_dim)``."""

    def __init__(self, embed_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.condition_dim = condition_dim
        self.timestep_embedder = _MLP(embed_dim, embed_dim)
        # Two size conditions (crop corner, target size), each two numbers of condition_dim sinusoids.
        self.condition_embedder = _MLP(4 * condition_dim, embed_dim)

    def _conditions(self, values: torch.Tensor) -> torch.Tensor:
        return sinusoid(values.flatten(), self.condition_dim).view(values.shape[0], -1)

    def forward(
        self, timestep: torch.Tensor, target_size: torch.Tensor, crop_coords: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        conditions = torch.cat((self._conditions(crop_coords), self._conditions(target_size)), dim=1)
        time_emb = self.timestep_embedder(sinusoid(timestep, self.embed_dim).to(dtype))
        condition_emb = self.condition_embedder(conditions.to(dtype))
        return F.silu(time_emb + condition_emb)


class _ImageProjector(nn.Module):
    """``(B, C, H, W)`` latents -> ``(B, H/p * W/p, D)`` tokens of ``p x p`` patches (key ``proj``)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size**2, dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = self.patch_size
        patches = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3, 5).flatten(1, 2)
        return self.proj(patches)


class _FeedForward(nn.Module):
    """Linear -> activation -> Linear keyed ``net.0.proj`` and ``net.2`` like diffusers' ``FeedForward``
    (``activation`` "gelu": exact GELU, the glyph projector; "silu": the prior-token projector)."""

    class _Proj(nn.Module):
        def __init__(self, dim_in: int, dim_out: int) -> None:
            super().__init__()
            self.proj = nn.Linear(dim_in, dim_out)

    def __init__(self, dim_in: int, inner: int, dim_out: int, activation: str) -> None:
        super().__init__()
        if activation not in ("gelu", "silu"):
            raise ValueError(f"activation must be 'gelu' or 'silu', got {activation!r}")
        self.activation = activation
        # Index 1 is a (parameter-free) dropout slot in the reference.
        self.net = nn.ModuleList([self._Proj(dim_in, inner), nn.Identity(), nn.Linear(inner, dim_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0].proj(x)
        h = F.gelu(h) if self.activation == "gelu" else F.silu(h)
        return self.net[2](h)


# --------------------------------------------------------------------------------------------------
# RoPE (image tokens only; "rotate half" layout)
# --------------------------------------------------------------------------------------------------

RopeTables = tuple[torch.Tensor, torch.Tensor]


def rope_tables(rows: int, columns: int, head_dim: int, device: torch.device) -> RopeTables:
    """float32 cos/sin ``(rows * columns, head_dim)`` of the image tokens (row-major): a head's channels are
    [row freqs | column freqs] twice, each axis with ``head_dim / 4`` frequencies ``10000 ** (-2i / (head_dim /
    2))``. Built with the reference's float32 operations, so the tables are bit-identical."""
    axis_dim = head_dim // 2
    inv_freq = 1.0 / (_ROPE_THETA ** (torch.arange(0, axis_dim, 2, dtype=torch.float32)[: axis_dim // 2] / axis_dim))
    freqs_h = torch.outer(torch.arange(rows), inv_freq)[:, None, :].expand(rows, columns, -1)
    freqs_w = torch.outer(torch.arange(columns), inv_freq)[None, :, :].expand(rows, columns, -1)
    freqs = torch.cat((freqs_h, freqs_w), dim=-1)
    freqs = torch.cat((freqs, freqs), dim=-1).reshape(rows * columns, -1)
    return freqs.cos().to(device), freqs.sin().to(device)


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate ``(B, N, H, Dh)`` by ``(N, Dh)`` tables: channel ``i`` of the first half pairs with channel ``i``
    of the second; computed in float32 and cast back to ``x.dtype``."""
    cos, sin = (t[None, :, None, :] for t in tables)
    first, second = x.unflatten(-1, (2, -1)).unbind(-2)
    rotated = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


class _AdaLayerNormZero(nn.Module):
    """The block's modulation ``linear(temb)`` (key ``linear``; temb is already SiLU'd) and the two streams'
    pre-attention norms (no parameters)."""

    def __init__(self, embed_dim: int, dim: int) -> None:
        super().__init__()
        self.norm = LayerNormNoAffine(dim, _EPS)
        self.norm_context = LayerNormNoAffine(dim, _EPS)
        self.linear = nn.Linear(embed_dim, _BLOCK_MOD_CHUNKS * dim)


@dataclass(frozen=True)
class _StreamMod:
    """One stream's modulation vectors, each ``(B, 1, D)``."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


def _split_modulation(params: torch.Tensor) -> tuple[_StreamMod, _StreamMod]:
    """``(B, 12D)`` -> (image, text) modulation; the chunks alternate image and text values."""
    c = [p[:, None] for p in params.chunk(_BLOCK_MOD_CHUNKS, dim=1)]
    image = _StreamMod(c[0], c[2], c[4], c[6], c[8], c[10])
    text = _StreamMod(c[1], c[3], c[5], c[7], c[9], c[11])
    return image, text


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` in the activation dtype, op by op, as the reference does."""
    return norm_modulate(x, shift, scale, norm="layer", eps=_EPS, precision="input")


class _Attention(ProjectionFusion):
    """Joint attention over ``[text, image]`` with one set of projections (keys ``to_q/to_k/to_v``,
    ``to_out.0``) and parameter-free per-head LayerNorms of q and k; RoPE on the image tokens only."""

    _GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv": ("to_q", "to_k", "to_v")}

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_q = LayerNormNoAffine(head_dim, _EPS)
        self.norm_k = LayerNormNoAffine(head_dim, _EPS)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        # A ModuleList so the key is ``to_out.0`` (index 1 is dropout in the reference: no params).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return self._GROUPS

    def qkv(self, joint: torch.Tensor, text_len: int, rope: RopeTables) -> tuple[torch.Tensor, ...]:
        """q, k, v ``(B, T + N, H, Dh)`` of the joint sequence, q and k normalised, image part rotated."""
        q, k, v = (x.unflatten(-1, (self.heads, self.head_dim)) for x in self.project(joint, "qkv"))
        q = self.norm_q(q)
        k = self.norm_k(k)
        q = torch.cat((q[:, :text_len], apply_rope(q[:, text_len:], rope)), dim=1)
        k = torch.cat((k[:, :text_len], apply_rope(k[:, text_len:], rope)), dim=1)
        return q, k, v

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        rope: RopeTables,
        backend: str,
        condition_kv: LayerKV | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the projected ``(image_out, text_out)``. ``condition_kv``: keys and values of condition
        images, put before this sequence's (its batch is 1 or B)."""
        text_len = text.shape[1]
        q, k, v = self.qkv(torch.cat((text, image), dim=1), text_len, rope)
        if condition_kv is not None:
            cond_k, cond_v = condition_kv
            batch = q.shape[0]
            k = torch.cat((cond_k.expand(batch, -1, -1, -1), k), dim=1)
            v = torch.cat((cond_v.expand(batch, -1, -1, -1), v), dim=1)
        out = self.to_out[0](attention(q, k, v, backend=backend))
        return out[:, text_len:], out[:, :text_len]


@dataclass(frozen=True)
class _BlockInputs:
    """What every block reads besides the two streams (computed once per forward)."""

    temb: torch.Tensor  # (B, time_embed_dim)
    rope: RopeTables
    backend: str


class GlmImageTransformerBlock(nn.Module):
    """Single-stream block: one attention and one MLP whose weights both streams share, each stream with its
    own adaLN-zero modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.norm1 = _AdaLayerNormZero(embed_dim, dim)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm2 = LayerNormNoAffine(dim, _EPS)
        self.norm2_context = LayerNormNoAffine(dim, _EPS)
        self.ff = GeluTanhFeedForward(dim)

    def attention_inputs(
        self, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, _StreamMod, _StreamMod]:
        """The modulated streams the attention reads, and both streams' modulation."""
        image_mod, text_mod = _split_modulation(self.norm1.linear(temb))
        return (
            _modulate(image, image_mod.shift_msa, image_mod.scale_msa),
            _modulate(text, text_mod.shift_msa, text_mod.scale_msa),
            image_mod,
            text_mod,
        )

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        inputs: _BlockInputs,
        condition_kv: LayerKV | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm_image, norm_text, image_mod, text_mod = self.attention_inputs(image, text, inputs.temb)
        attn_image, attn_text = self.attn1(norm_image, norm_text, inputs.rope, inputs.backend, condition_kv)
        image = gated_residual(image, attn_image, image_mod.gate_msa, precision="input")
        text = gated_residual(text, attn_text, text_mod.gate_msa, precision="input")

        ff_image = self.ff(_modulate(image, image_mod.shift_mlp, image_mod.scale_mlp))
        ff_text = self.ff(_modulate(text, text_mod.shift_mlp, text_mod.scale_mlp))
        image = gated_residual(image, ff_image, image_mod.gate_mlp, precision="input")
        text = gated_residual(text, ff_text, text_mod.gate_mlp, precision="input")
        return image, text


class _OutputNorm(nn.Module):
    """Final adaptive LayerNorm: ``norm(x) * (1 + scale) + shift`` from ``linear(temb)`` (key ``linear``; no
    SiLU before it, unlike most DiTs). The chunk order is (scale, shift)."""

    def __init__(self, dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, 2 * dim)
        self.norm = LayerNormNoAffine(dim, _EPS)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb.to(x.dtype)).chunk(2, dim=1)
        return _modulate(x, shift[:, None], scale[:, None])


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class GlmImageTransformer2DModel(nn.Module):
    """GLM-Image DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters (no buffers); RoPE tables are built per forward.

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here so a bad
            name fails at load time. Can be changed later via :attr:`attention_backend`.
    """

    #: The compile unit (:mod:`sgl_diffusion.runtime.compile`): the single-stream blocks.
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def __init__(self, config: GlmImageTransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim

        self.image_projector = _ImageProjector(config.in_channels, dim, config.patch_size)
        self.glyph_projector = _FeedForward(config.text_embed_dim, dim, dim, "gelu")
        self.prior_token_embedding = nn.Embedding(config.prior_vq_quantizer_codebook_size, dim)
        self.prior_projector = _FeedForward(dim, dim, dim, "silu")
        self.time_condition_embed = _TimeConditionEmbed(config.time_embed_dim, config.condition_dim)
        self.transformer_blocks = nn.ModuleList(
            [GlmImageTransformerBlock(dim, heads, head_dim, config.time_embed_dim) for _ in range(config.num_layers)]
        )
        self.norm_out = _OutputNorm(dim, config.time_embed_dim)
        self.proj_out = nn.Linear(dim, config.patch_size * config.patch_size * config.out_channels)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | GlmImageTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
    ) -> GlmImageTransformer2DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, GlmImageTransformerConfig) else GlmImageTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    def _token_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        _, channels, height, width = latents.shape
        if channels != self.config.in_channels or height % p or width % p:
            raise ValueError(
                f"hidden_states must be (B, {self.config.in_channels}, H, W) with H and W multiples of {p}, got "
                f"{tuple(latents.shape)}"
            )
        return height // p, width // p

    def _image_tokens(self, latents: torch.Tensor, prior_token_id: torch.Tensor, prior_token_drop: torch.Tensor):
        """Patch tokens plus the projected prior-token embeddings (zeroed where ``prior_token_drop``)."""
        rows, columns = self._token_grid(latents)
        batch = latents.shape[0]
        if tuple(prior_token_id.shape) != (batch, rows * columns):
            raise ValueError(
                f"prior_token_id must be (batch, tokens) = ({batch}, {rows * columns}) for latents "
                f"{tuple(latents.shape)}, got {tuple(prior_token_id.shape)}"
            )
        image = self.image_projector(latents)
        prior = self.prior_token_embedding(prior_token_id)
        drop = prior_token_drop.to(device=prior.device, dtype=torch.bool)
        if drop.ndim == 1:
            drop = drop[:, None].expand(batch, rows * columns)
        # The reference multiplies the dropped rows by 0.0 in place (-0.0 for negative entries, as here).
        prior = torch.where(drop[..., None], prior * 0.0, prior)
        return image + self.prior_projector(prior), (rows, columns)

    @staticmethod
    def _batch_vector(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
        t = t.to(device).reshape(-1)
        if t.shape[0] == 1 and batch != 1:
            return t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"`timestep` has {t.shape[0]} values for a batch of {batch}")
        return t

    @staticmethod
    def _batch_pairs(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
        if value.ndim != 2 or value.shape[1] != 2 or value.shape[0] not in (1, batch):
            raise ValueError(f"`{name}` must be (batch, 2) or (1, 2), got {tuple(value.shape)}")
        return value.expand(batch, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        prior_token_id: torch.Tensor,
        prior_token_drop: torch.Tensor,
        timestep: torch.Tensor | float,
        target_size: torch.Tensor,
        crop_coords: torch.Tensor,
        condition_kv: Sequence[LayerKV] | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            hidden_states: ``(B, in_channels, H, W)`` latents.
            encoder_hidden_states: ``(B, T, text_embed_dim)`` glyph embeddings (T may be 0).
            prior_token_id: ``(B, H/p * W/p)`` int64 codebook ids of the prior, one per DiT token.
            prior_token_drop: ``(B,)`` or ``(B, H/p * W/p)`` bool; True zeroes the prior embedding (the
                unconditional branch of classifier-free guidance).
            timestep: ``(B,)`` (or scalar) model time, the scheduler timestep minus 1 as the pipeline passes it.
            target_size: ``(B, 2)`` (height, width) of the image in pixels.
            crop_coords: ``(B, 2)`` top-left crop corner (zeros).
            condition_kv: per block, keys and values of condition images (:meth:`condition_kv`), or None.

        Returns:
            ``(B, out_channels, H, W)`` velocity in the model dtype.
        """
        batch = hidden_states.shape[0]
        image, (rows, columns) = self._image_tokens(hidden_states, prior_token_id, prior_token_drop)
        text = self.glyph_projector(encoder_hidden_states)
        dtype, device = image.dtype, image.device
        temb = self.time_condition_embed(
            self._batch_vector(timestep, batch, device),
            self._batch_pairs("target_size", target_size, batch),
            self._batch_pairs("crop_coords", crop_coords, batch),
            dtype,
        )
        inputs = _BlockInputs(
            temb=temb,
            rope=rope_tables(rows, columns, self.config.attention_head_dim, device),
            backend=self.attention_backend,
        )
        if condition_kv is not None and len(condition_kv) != len(self.transformer_blocks):
            raise ValueError(f"condition_kv has {len(condition_kv)} entries for {len(self.transformer_blocks)} blocks")
        for index, block in enumerate(self.transformer_blocks):
            image, text = block(image, text, inputs, None if condition_kv is None else condition_kv[index])
        out = self.proj_out(self.norm_out(image, temb))
        p = self.config.patch_size
        out = out.reshape(batch, rows, columns, -1, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)

    def condition_kv(
        self,
        latents: torch.Tensor,
        prior_token_id: torch.Tensor,
        target_size: torch.Tensor,
    ) -> list[LayerKV]:
        """Every block's keys and values of one condition image's tokens, as the reference's "write" pass
        computes them: the clean latents ``(1, C, H, W)`` at timestep 0 with their own prior tokens, no text,
        crop corner 0. Several condition images: concatenate each block's entries along the tokens."""
        batch = latents.shape[0]
        image, (rows, columns) = self._image_tokens(
            latents, prior_token_id, torch.zeros(batch, dtype=torch.bool, device=latents.device)
        )
        device = image.device
        text = image.new_zeros(batch, 0, image.shape[-1])
        temb = self.time_condition_embed(
            torch.zeros(batch, device=device),
            self._batch_pairs("target_size", target_size, batch),
            torch.zeros(batch, 2, device=device),
            image.dtype,
        )
        inputs = _BlockInputs(
            temb=temb,
            rope=rope_tables(rows, columns, self.config.attention_head_dim, device),
            backend=self.attention_backend,
        )
        kv: list[LayerKV] = []
        for block in self.transformer_blocks:
            norm_image, norm_text, _, _ = block.attention_inputs(image, text, inputs.temb)
            _, k, v = block.attn1.qkv(torch.cat((norm_text, norm_image), dim=1), 0, inputs.rope)
            kv.append((k, v))
            image, text = block(image, text, inputs)
        return kv

    def tokens_per_sample(self, hidden_states: torch.Tensor) -> int:
        """Image tokens of one sample of the latents ``(B, C, H, W)``: what the engine's CFG-batching and
        CUDA-graph size rules count."""
        rows, columns = self._token_grid(hidden_states)
        return rows * columns

    def fuse_projections(self) -> int:
        """Pack each attention's q/k/v projections into one GEMM (call after loading weights). State-dict keys
        and values are unchanged. Returns the number of packed groups (one per block)."""
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
