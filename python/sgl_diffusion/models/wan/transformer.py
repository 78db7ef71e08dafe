"""Native Wan transformer (Wan2.1 T2V / I2V, Wan2.2 TI2V-5B and the two A14B experts).

Module attribute names mirror diffusers' ``WanTransformer3DModel`` exactly, so ``state_dict()`` keys
are the checkpoint's keys and a diffusers-format ``transformer/`` folder loads with ``strict=True``.
Operation order, including every place the reference upcasts to float32 and casts back, follows the
reference as well: the goal is numerical parity with diffusers in bf16, not just "the same math".

One class covers every variant; what differs is only configuration:

* Wan2.1 T2V / Wan2.2 A14B experts: plain text cross-attention;
* Wan2.1 I2V (``image_dim`` + ``added_kv_proj_dim``): CLIP image tokens go through
  ``condition_embedder.image_embedder`` and get a second key/value projection in every cross-attention;
* Wan2.2 TI2V-5B: same graph as T2V with 48 channels, but the pipeline passes one timestep *per token*
  (``(B, seq_len)``), which turns every adaLN modulation into a per-token one.

Sparse attention (``--attention-backend sliding_tile_attn`` / ``video_sparse_attn``,
:mod:`sgl_diffusion.layers.sparse_attention`) replaces the *self*-attention over the video tokens, which then
tells the attention seam its token grid, layer and denoising step; the cross-attention stays exact
(``torch_sdpa``), as in FastVideo. With ``video_sparse_attn`` every block also has FastVideo's gate projection
``to_gate_compress`` (key ``blocks.N.to_gate_compress``, a ``dim -> dim`` Linear of the self-attention's
input, as the FastWan2.1 checkpoints carry it), which weighs VSA's compressed branch. A checkpoint without
those weights loads with zero gates (FastVideo's rule: the compressed branch then adds nothing), with a
warning; a checkpoint with them loads under any other backend with a warning that they are unused. With any
other backend the model, its keys and its arithmetic are exactly what they were without these features.

Shapes used below: ``B`` batch, ``S`` video tokens (``F' * H' * W'`` after patchify), ``T`` context
tokens, ``D`` inner dim (``num_attention_heads * attention_head_dim``), ``H`` heads, ``Dh`` head dim.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.attention import DEFAULT_ATTENTION_BACKEND, attention, resolve_attention_backend
from ...layers.fused import gated_residual, norm_modulate, qk_norm_rope
from ...layers.linear import ProjectionFusion, fuse_model_projections, linear_gelu_tanh, unfuse_model_projections
from ...layers.norms import RMSNorm
from ...layers.rotary import rope_tables_1d
from ...layers.sparse_attention import VideoAttention, VideoSparseSettings

logger = logging.getLogger(__name__)

__all__ = ["WanTransformer3DModel", "WanTransformerConfig", "wan_rope_tables"]

_SPARSE = ("sliding_tile_attn", "video_sparse_attn")

# Wan2.1 I2V cross-attention: the text part of the context is *always* the last 512 tokens (the UMT5
# max_sequence_length the checkpoint was trained with). The reference hard-codes the same number.
I2V_TEXT_CONTEXT_LEN = 512
_ROPE_THETA = 10000.0
# The 6-way block modulation and the 2-way output modulation (chunk counts of the scale_shift_tables).
_BLOCK_MOD_CHUNKS = 6
_OUT_MOD_CHUNKS = 2


@dataclass(frozen=True)
class WanTransformerConfig:
    """The fields of a Wan ``transformer/config.json`` (defaults = diffusers' defaults = Wan2.1-14B)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    # Every released checkpoint says "rms_norm_across_heads". Like the reference, the q/k RMS norms
    # (over the full inner dim, across heads) exist whatever this says, so the keys always match.
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen dataclass hashable.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.attention_head_dim % 2 != 0:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} must be even: RoPE rotates channel pairs")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> WanTransformerConfig:
        """Build from a parsed ``config.json``; bookkeeping (``_class_name``...) and unknown keys are ignored."""
        return config_from_dict(cls, cfg)


# --------------------------------------------------------------------------------------------------
# Small layers
# --------------------------------------------------------------------------------------------------


class _FP32LayerNorm(nn.Module):
    """LayerNorm evaluated in float32 and cast back to the input dtype (keys ``weight``/``bias`` if affine).

    The blocks feed it ``x.float()``, so its output stays float32 there and the adaLN modulation that
    follows also runs in float32 -- the reference's precision choice, which bf16 parity depends on.
    """

    def __init__(self, dim: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.dim,), weight, bias, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


class _MLP(nn.Module):
    """Linear -> activation -> Linear (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.activation == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


class _FeedForward(nn.Module):
    """Linear -> GELU -> Linear, keyed ``net.0.proj`` and ``net.2`` like the checkpoint."""

    class _ProjGelu(nn.Module):
        def __init__(self, dim_in: int, dim_out: int, approximate: str) -> None:
            super().__init__()
            self.proj = nn.Linear(dim_in, dim_out)
            self.approximate = approximate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.approximate == "tanh":
                # On CUDA: the GELU in the GEMM's epilogue (sgl_diffusion.layers.linear).
                return linear_gelu_tanh(x, self.proj.weight, self.proj.bias)
            return F.gelu(self.proj(x), approximate=self.approximate)

    def __init__(self, dim: int, inner_dim: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        # Index 1 is a (parameter-free) dropout slot in the reference; an Identity keeps the output
        # Linear at index 2 so its checkpoint key is ``net.2``.
        self.net = nn.ModuleList(
            [self._ProjGelu(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, dim_out)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(N,) -> (N, dim)`` float32 embedding laid out as ``[cos | sin]``.

    Frequencies are ``max_period ** (-i / (dim/2))`` for ``i < dim/2`` (no frequency offset); an odd
    ``dim`` gets one zero column at the end. Timesteps are taken as-is (0..1000 scale, int or float).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------------
# 3D RoPE
# --------------------------------------------------------------------------------------------------


def wan_rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w): h and w get ``2 * (head_dim // 6)`` each, time takes the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


RopeTables = tuple[torch.Tensor, torch.Tensor]


def wan_rope_axis_tables(head_dim: int, positions: int, theta: float = _ROPE_THETA) -> list[RopeTables]:
    """Per-axis cos/sin tables ``(positions, axis_dim)`` float32 (CPU) for frames, rows and columns.

    Angles are computed in float64 on the CPU (like the reference's precomputed table) so values do not
    depend on the device; row ``p`` of an axis's table is position ``p`` whatever ``positions`` is.
    """
    return [rope_tables_1d(axis_dim, torch.arange(positions), theta) for axis_dim in wan_rope_axis_dims(head_dim)]


def assemble_wan_rope(axis_tables: Sequence[RopeTables], grid: tuple[int, int, int]) -> RopeTables:
    """cos/sin tables ``(F' * H' * W', head_dim)`` for a latent token grid, on the axis tables' device.

    Token ``(f, h, w)`` (row-major, the order patchify flattens in) rotates its first ``t_dim`` channels
    by ``f``, the next ``h_dim`` by ``h`` and the last ``w_dim`` by ``w``. Only device ops: under a CUDA
    graph this runs inside the graph (nothing read from the host, nothing cached per grid).
    """
    frames, height, width = grid

    def assemble(which: int) -> torch.Tensor:
        t_tab, h_tab, w_tab = (tables[which] for tables in axis_tables)
        t_dim, h_dim, w_dim = t_tab.shape[1], h_tab.shape[1], w_tab.shape[1]
        parts = (
            t_tab[:frames].view(frames, 1, 1, t_dim).expand(frames, height, width, t_dim),
            h_tab[:height].view(1, height, 1, h_dim).expand(frames, height, width, h_dim),
            w_tab[:width].view(1, 1, width, w_dim).expand(frames, height, width, w_dim),
        )
        return torch.cat(parts, dim=-1).reshape(frames * height * width, t_dim + h_dim + w_dim)

    return assemble(0), assemble(1)


def wan_rope_tables(
    head_dim: int, grid: tuple[int, int, int], theta: float = _ROPE_THETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(F' * H' * W', head_dim)`` float32 (CPU) for a latent token grid, pairs interleaved."""
    return assemble_wan_rope(wan_rope_axis_tables(head_dim, max(grid), theta), grid)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class _WanAttention(ProjectionFusion):
    """Multi-head attention with RMS q/k norms over the full inner dim (across heads).

    Keys: ``to_q/to_k/to_v``, ``to_out.0``, ``norm_q/norm_k``; with ``added_kv_proj_dim`` (Wan2.1 I2V
    cross-attention) also ``add_k_proj/add_v_proj`` and ``norm_added_k`` for the image tokens.

    Projections that read the same input run as one GEMM after :meth:`fuse_projections`: q/k/v of the
    self-attention (group ``qkv``); k/v of the text and k/v of the image tokens in the cross-attention
    (``kv``, ``add_kv``; its q reads the video tokens).
    """

    _SELF_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv": ("to_q", "to_k", "to_v")}
    _CROSS_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"kv": ("to_k", "to_v")}
    _CROSS_IMAGE_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        **_CROSS_GROUPS,
        "add_kv": ("add_k_proj", "add_v_proj"),
    }

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        eps: float,
        added_kv_proj_dim: int | None = None,
        *,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.cross = cross
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        # A ModuleList so the key is ``to_out.0`` (index 1 is dropout in the reference: no params).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.norm_q = RMSNorm(inner, eps)
        self.norm_k = RMSNorm(inner, eps)
        self.has_image_kv = added_kv_proj_dim is not None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
            self.norm_added_k = RMSNorm(inner, eps)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        if not self.cross:
            return self._SELF_GROUPS
        return self._CROSS_IMAGE_GROUPS if self.has_image_kv else self._CROSS_GROUPS

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def _normed_heads(self, x: torch.Tensor, norm: RMSNorm, rope: RopeTables | None = None) -> torch.Tensor:
        """``norm`` over all inner channels (across heads) of a projection, split into heads, then RoPE."""
        cos, sin = rope if rope is not None else (None, None)
        return qk_norm_rope(self._heads(x), norm.weight, cos, sin, eps=norm.eps, norm_over="all")

    def forward_self(
        self, x: torch.Tensor, rope: RopeTables, backend: str, video: VideoAttention | None = None
    ) -> torch.Tensor:
        """Self-attention over the video tokens with 3D RoPE on q and k -> ``(B, S, D)``; ``video`` describes
        the token grid to a sparse backend (None for the dense ones)."""
        q, k, v = self.project(x, "qkv")
        q = self._normed_heads(q, self.norm_q, rope)
        k = self._normed_heads(k, self.norm_k, rope)
        if video is None:
            return self.to_out[0](attention(q, k, self._heads(v), backend=backend))
        return self.to_out[0](attention(q, k, self._heads(v), backend=backend, video=video))

    def forward_cross(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor | None,
        backend: str,
    ) -> torch.Tensor:
        """Cross-attention to the text tokens, plus (I2V) a separate attention to the image tokens.

        The two attentions share the query and are summed before the output projection (two softmaxes,
        not one over the concatenation), as the checkpoint was trained.
        """
        q = self._normed_heads(self.to_q(x), self.norm_q)
        k, v = self.project(text, "kv")
        out = attention(q, self._normed_heads(k, self.norm_k), self._heads(v), backend=backend)
        # An empty image context (I2V model called without image tokens) contributes exactly zero.
        if image is not None and image.shape[1] > 0:
            k_img, v_img = self.project(image, "add_kv")
            k_img = self._normed_heads(k_img, self.norm_added_k)
            out = out + attention(q, k_img, self._heads(v_img), backend=backend)
        return self.to_out[0](out)


# --------------------------------------------------------------------------------------------------
# Conditioning embeddings
# --------------------------------------------------------------------------------------------------


class _WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm -> GELU MLP -> LayerNorm (keys ``norm1``, ``ff``, ``norm2``).

    With ``pos_embed_seq_len`` (first-last-frame checkpoints) a learned ``pos_embed`` is added after
    pairing consecutive batch rows into one sequence (``(2B, L, C) -> (B, 2L, C)``), the reference's layout
    for [first image ; last image]. Rows that are already pairs (``(B, 2L, C)``, what the pipeline passes so
    that each request keeps one row through batching and CFG) are taken as they are.
    """

    def __init__(self, in_dim: int, out_dim: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        # eps 1e-5 here (LayerNorm's default in the reference), unlike the blocks' config eps.
        self.norm1 = _FP32LayerNorm(in_dim, 1e-5, affine=True)
        self.ff = _FeedForward(in_dim, in_dim, out_dim, approximate="none")
        self.norm2 = _FP32LayerNorm(out_dim, 1e-5, affine=True)
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim))
        else:
            self.register_parameter("pos_embed", None)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            _, seq, dim = image.shape
            if seq != self.pos_embed.shape[1]:
                image = image.reshape(-1, 2 * seq, dim)
            image = image + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class _WanConditionEmbedder(nn.Module):
    """Timestep, text and (I2V) image conditioning (key prefix ``condition_embedder``)."""

    def __init__(self, config: WanTransformerConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = _MLP(config.freq_dim, dim, activation="silu")
        self.time_proj = nn.Linear(dim, _BLOCK_MOD_CHUNKS * dim)
        self.text_embedder = _MLP(config.text_dim, dim, activation="gelu_tanh")
        if config.image_dim is not None:
            self.image_embedder = _WanImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len)
        else:
            self.image_embedder = None

    def time(self, timestep: torch.Tensor, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` or ``(B, S)`` timesteps -> ``temb`` ``(B, [S,] D)`` and ``time_proj`` ``(B, [S,] 6, D)``.

        The sinusoid is float32 and is fed to ``time_embedder`` in *that module's* dtype (diffusers keeps
        it in float32 when loading bf16 weights); its output is then cast to the activation dtype before
        ``time_proj``.
        """
        emb = timestep_sinusoid(timestep.reshape(-1), self.freq_dim).unflatten(0, timestep.shape)
        emb = emb.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(emb).to(act_dtype)
        proj = self.time_proj(F.silu(temb))
        return temb, proj.unflatten(-1, (_BLOCK_MOD_CHUNKS, -1))


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _norm_modulate(norm: _FP32LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in float32, rounded once to ``x.dtype`` (fused on CUDA).

    shift/scale are float32 ``(B, 1, D)`` (per sample) or ``(B, S, D)`` (per token) views.
    """
    return norm_modulate(x, shift, scale, norm="layer", eps=norm.eps, weight=norm.weight, bias=norm.bias)


class WanTransformerBlock(nn.Module):
    """Self-attention (RoPE) -> cross-attention -> FFN, with adaLN on the first and last.

    The residual adds of the modulated branches and all modulations run in float32, then cast back to
    the activation dtype; the cross-attention residual is added in the activation dtype. This mirrors
    the reference exactly so bf16 results round the same way. On CUDA the norm + modulation and the
    gated residual adds are fused kernels (:mod:`sgl_diffusion.layers.fused`) with the same float32
    arithmetic, rounded once.
    """

    def __init__(self, config: WanTransformerConfig, *, vsa_gate: bool = False) -> None:
        super().__init__()
        dim, heads = config.inner_dim, config.num_attention_heads
        head_dim, eps = config.attention_head_dim, config.eps
        self.norm1 = _FP32LayerNorm(dim, eps, affine=False)
        self.attn1 = _WanAttention(dim, heads, head_dim, eps)
        # VSA's learned gate on its compressed branch (FastVideo's WanTransformerBlock_VSA); only with VSA.
        self.to_gate_compress = nn.Linear(dim, config.inner_dim) if vsa_gate else None
        self.attn2 = _WanAttention(dim, heads, head_dim, eps, added_kv_proj_dim=config.added_kv_proj_dim, cross=True)
        self.norm2 = _FP32LayerNorm(dim, eps, affine=True) if config.cross_attn_norm else nn.Identity()
        self.ffn = _FeedForward(dim, config.ffn_dim, dim, approximate="tanh")
        self.norm3 = _FP32LayerNorm(dim, eps, affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, _BLOCK_MOD_CHUNKS, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor | None,
        time_proj: torch.Tensor,
        rope: RopeTables,
        backend: str,
        cross_backend: str | None = None,
        video: VideoAttention | None = None,
    ) -> torch.Tensor:
        """``backend`` runs the self-attention (with ``video``, the token grid for a sparse one), ``cross_backend``
        (default: ``backend``) the cross-attention."""
        # time_proj: (B, 1, 6, D) or (B, S, 6, D) -> six float32 (B, 1|S, D) modulation vectors.
        mods = (self.scale_shift_table[None] + time_proj.float()).unbind(2)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods

        h = _norm_modulate(self.norm1, x, shift_sa, scale_sa)
        if video is not None and self.to_gate_compress is not None:
            gate = self.to_gate_compress(h).unflatten(-1, (self.attn1.heads, self.attn1.head_dim))
            video = dataclasses.replace(video, gate=gate)
        x = gated_residual(x, self.attn1.forward_self(h, rope, backend, video), gate_sa)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2.forward_cross(h, text, image, cross_backend or backend)

        h = _norm_modulate(self.norm3, x, shift_ff, scale_ff)
        return gated_residual(x, self.ffn(h), gate_ff)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class WanTransformer3DModel(nn.Module):
    """Wan DiT with diffusers' parameter names.

    Construct with :meth:`from_config` from ``transformer/config.json``. Safe to build under
    ``torch.device("meta")``: the module holds only parameters (no buffers); RoPE tables are computed
    (and cached for the last grid) on first use.

    Args:
        config: architecture hyper-parameters.
        attention_backend: name for :func:`sgl_diffusion.layers.attention.attention`, validated here
            so a bad name fails at load time. Can be changed later via :attr:`attention_backend` (between
            dense backends; a sparse one is chosen at construction, which decides the VSA gates).
        video_sparse: the sparse backends' settings (STA's mask strategy, VSA's sparsity); default: none /
            sparsity 0.
    """

    #: Parameters whose dotted name contains one of these components stay float32 when diffusers loads
    #: the model in bf16/fp16 (its ``_keep_in_fp32_modules``). Loading ours the same way (see
    #: :meth:`param_dtype`) is what makes bf16 outputs round like the reference's.
    keep_in_fp32_modules: ClassVar[tuple[str, ...]] = (
        "time_embedder",
        "scale_shift_table",
        "norm1",
        "norm2",
        "norm3",
    )
    #: Checkpoint keys to drop silently on load (some I2V exports carry an unused ``norm_added_q``); see
    #: :attr:`ignore_unexpected_key_components` for VSA's gates.
    _IGNORED_KEYS: ClassVar[tuple[str, ...]] = ("norm_added_q",)
    #: VSA's gate projection (FastWan checkpoints): see the module docstring for how it loads.
    VSA_GATE = "to_gate_compress"
    #: The block list `--enable-torch-compile` compiles block by block.
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("blocks",)

    def __init__(
        self,
        config: WanTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
        video_sparse: VideoSparseSettings | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend, video_tokens=True)
        self.video_sparse = video_sparse or VideoSparseSettings()
        self.video_sparse.check_model(self.attention_backend, config.num_layers, config.num_attention_heads)
        vsa = self.sparse_attention == "video_sparse_attn"
        dim = config.inner_dim
        if (config.image_dim is None) != (config.added_kv_proj_dim is None):
            # A half-I2V model would either drop image tokens or attend to them unprojected.
            logger.warning(
                "Wan config has image_dim=%s but added_kv_proj_dim=%s; the Wan2.1 I2V architecture sets both",
                config.image_dim,
                config.added_kv_proj_dim,
            )

        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = _WanConditionEmbedder(config)
        self.blocks = nn.ModuleList([WanTransformerBlock(config, vsa_gate=vsa) for _ in range(config.num_layers)])
        self.norm_out = _FP32LayerNorm(dim, config.eps, affine=False)
        self.proj_out = nn.Linear(dim, config.resolved_out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, _OUT_MOD_CHUNKS, dim) / dim**0.5)

        # Per-axis RoPE tables for rope_max_seq_len positions, per device, made on first use. Not a buffer:
        # keeps the module meta-constructible and the state_dict equal to the checkpoint's. Never
        # replaced, so a CUDA graph may keep reading them.
        self._rope_axes: dict[torch.device, list[RopeTables]] = {}
        self._warned_context_len = False

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | WanTransformerConfig,
        attention_backend: str | None = "torch_sdpa",
        video_sparse: VideoSparseSettings | None = None,
    ) -> WanTransformer3DModel:
        """Build (parameters uninitialised-but-allocated, or meta under a meta device context)."""
        config = cfg if isinstance(cfg, WanTransformerConfig) else WanTransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend, video_sparse=video_sparse)

    @property
    def sparse_attention(self) -> str | None:
        """The sparse backend the self-attention runs (``sliding_tile_attn`` / ``video_sparse_attn``), or None."""
        return self.attention_backend if self.attention_backend in _SPARSE else None

    @property
    def ignore_unexpected_key_components(self) -> tuple[str, ...]:  # type: ignore[override]
        # A dense model loads a VSA checkpoint (FastWan2.1) without its gates: see loaded_key_report.
        base = self._IGNORED_KEYS
        return base if self.sparse_attention == "video_sparse_attn" else (*base, self.VSA_GATE)

    @property
    def zero_missing_key_components(self) -> tuple[str, ...]:
        """Parameters a checkpoint may lack, loaded as zeros then: VSA's gates (FastVideo's rule)."""
        return (self.VSA_GATE,) if self.sparse_attention == "video_sparse_attn" else ()

    def loaded_key_report(self, ignored: Sequence[str], zeroed: Sequence[str]) -> None:
        """Called by the loader with the checkpoint keys it dropped and the parameters it set to zero."""
        gates = [name for name in ignored if self.VSA_GATE in name.split(".")]
        if gates:
            logger.warning(
                "the checkpoint carries %d VSA gate tensors (%s) that --attention-backend %s does not use: it was "
                "trained with video sparse attention, so dense attention gives an approximation of it; "
                "--attention-backend video_sparse_attn uses them",
                len(gates),
                self.VSA_GATE,
                self.attention_backend,
            )
        if zeroed:
            logger.warning(
                "the checkpoint has no VSA gates (%s, %d tensors): they are zero, so video_sparse_attn's "
                "compressed branch adds nothing (only its top-k sparse attention acts)",
                self.VSA_GATE,
                len(zeroed),
            )

    @classmethod
    def param_dtype(cls, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype diffusers would load checkpoint key ``name`` in when asked for ``dtype``.

        float32 for the :attr:`keep_in_fp32_modules` (time embedder, modulation tables, block norms and the
        image embedder's norms), ``dtype`` for everything else.
        """
        if dtype != torch.float32 and any(part in cls.keep_in_fp32_modules for part in name.split(".")):
            return torch.float32
        return dtype

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> RopeTables:
        if any(n > self.config.rope_max_seq_len for n in grid):
            # The reference precomputes rope_max_seq_len positions per axis and fails beyond them.
            raise ValueError(f"latent grid {grid} exceeds rope_max_seq_len={self.config.rope_max_seq_len}")
        axes = self._rope_axes.get(device)
        if axes is None:
            tables = wan_rope_axis_tables(self.config.attention_head_dim, self.config.rope_max_seq_len)
            axes = [(cos.to(device), sin.to(device)) for cos, sin in tables]
            self._rope_axes[device] = axes
        return assemble_wan_rope(axes, grid)

    def tokens_per_sample(self, hidden_states: torch.Tensor) -> int:
        """Video tokens of one sample of ``hidden_states`` ``(B, C, F, H, W)`` (after patchifying)."""
        return math.prod(n // p for n, p in zip(hidden_states.shape[2:], self.config.patch_size, strict=True))

    @staticmethod
    def _as_timestep(timestep: torch.Tensor | float, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Normalise to ``(B,)`` (one timestep per sample) or ``(B, S)`` (one per video token)."""
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep, dtype=torch.float32)
        t = t.to(device)
        if t.ndim == 0:
            return t.expand(batch)
        if t.ndim == 1:
            if t.shape[0] == 1 and batch != 1:
                return t.expand(batch)
            if t.shape[0] != batch:
                raise ValueError(f"`timestep` has {t.shape[0]} values for a batch of {batch}")
            return t
        if t.ndim == 2:
            if t.shape[1] != seq_len:
                raise ValueError(f"per-token `timestep` has {t.shape[1]} columns for {seq_len} video tokens")
            if t.shape[0] == 1 and batch != 1:
                return t.expand(batch, -1)
            if t.shape[0] != batch:
                raise ValueError(f"`timestep` has {t.shape[0]} rows for a batch of {batch}")
            return t
        raise ValueError(f"`timestep` must be scalar, (B,) or (B, seq_len), got {tuple(t.shape)}")

    def _split_context(
        self, text: torch.Tensor, image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decide which context tokens the image key/value projections see.

        The reference concatenates ``[image ; text]`` and then, in every I2V cross-attention, treats
        everything *before the last 512 tokens* as image tokens. We apply the same rule once, with the
        same (Python slice) semantics, so results match even when the text is not 512 long -- in which
        case the split is wrong in the reference too, hence the warning.
        """
        if image is not None:
            context = torch.cat((image, text), dim=1)
        else:
            context = text
        if self.config.added_kv_proj_dim is None:
            return context, None
        if text.shape[1] != I2V_TEXT_CONTEXT_LEN and not self._warned_context_len:
            logger.warning(
                "Wan I2V expects the text context padded to %d tokens (got %d): image/text tokens will be "
                "mis-split exactly as in diffusers; encode prompts with max_sequence_length=%d",
                I2V_TEXT_CONTEXT_LEN,
                text.shape[1],
                I2V_TEXT_CONTEXT_LEN,
            )
            self._warned_context_len = True
        split = context.shape[1] - I2V_TEXT_CONTEXT_LEN
        return context[:, split:], context[:, :split]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        attention_step: int | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for a batch of video latents.

        Args:
            hidden_states: ``(B, in_channels, F, H, W)`` latents (for Wan2.1 I2V the 16 noisy channels
                followed by the 20 condition channels: 4 mask + 16 first-frame latents).
            timestep: the scheduler's timestep on the 0..1000 scale (not divided by 1000), either
                a scalar / ``(B,)`` -- one value per sample; different values per sample are allowed, so
                requests at different steps can share a batch -- or ``(B, seq_len)`` with one value per
                video token (``seq_len = F/pt * H/ph * W/pw`` in patchify order), which is what
                ``WanPipeline(expand_timesteps=True)`` passes for Wan2.2 TI2V-5B (0 on the clean
                conditioning frame's tokens). Integer or float; used in float32.
            encoder_hidden_states: ``(B, T, text_dim)`` UMT5 hidden states (zero-padded; for Wan2.1 I2V
                T must be 512, see :meth:`_split_context`).
            encoder_hidden_states_image: ``(B, L, image_dim)`` CLIP vision tokens (``hidden_states[-2]``,
                L = 257) for Wan2.1 I2V; ``(2B, L, image_dim)`` [first; last] pairs for first-last-frame
                checkpoints with ``pos_embed_seq_len``. Must be None for models without ``image_dim``.
            attention_step: the denoising step's index (from 0), which sliding tile attention's mask strategy
                is keyed by; unused by the other backends.

        Returns:
            ``(B, out_channels, F, H, W)`` in the activation dtype.

        Every sample is processed independently (per-sample timesteps only enter the modulation), so
        batching requests changes no row's result beyond floating-point reduction-order effects.
        """
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        seq_len = math.prod(grid)
        rope = self._rope(grid, hidden_states.device)

        # (B, D, F', H', W') -> (B, S, D); contiguous as the reference (its GEMMs see the same strides).
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        t = self._as_timestep(timestep, batch, seq_len, x.device)
        temb, time_proj = self.condition_embedder.time(t, encoder_hidden_states.dtype)
        if t.ndim == 1:
            # One modulation per sample, broadcast over the tokens: (B, D) -> (B, 1, D).
            temb, time_proj = temb[:, None], time_proj[:, None]

        text = self.condition_embedder.text_embedder(encoder_hidden_states)
        image = None
        if encoder_hidden_states_image is not None:
            if self.condition_embedder.image_embedder is None:
                raise ValueError("this Wan checkpoint has no image_dim: `encoder_hidden_states_image` must be None")
            image = self.condition_embedder.image_embedder(encoder_hidden_states_image)
        text, image = self._split_context(text, image)

        backend = self.attention_backend
        if self.sparse_attention is None:
            for block in self.blocks:
                x = block(x, text, image, time_proj, rope, backend)
        else:
            sta = self.sparse_attention == "sliding_tile_attn"
            heads = self.config.num_attention_heads
            for layer, block in enumerate(self.blocks):
                # STA's windows are looked up here, outside the compiled blocks (see VideoAttention.windows).
                windows = self.video_sparse.sta_windows(attention_step, layer, heads) if sta else None
                video = VideoAttention(grid, layer, self.video_sparse, attention_step, windows=windows)
                x = block(x, text, image, time_proj, rope, backend, DEFAULT_ATTENTION_BACKEND, video)

        # Output adaLN uses temb itself (not time_proj): (1, 1, 2, D) + (B, 1|S, 1, D), order (shift, scale).
        shift, scale = (self.scale_shift_table[None] + temb[:, :, None]).unbind(2)
        x = _norm_modulate(self.norm_out, x, shift, scale)
        x = self.proj_out(x)

        # Unpatchify: (B, S, pt*ph*pw*C) -> (B, C, F, H, W).
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def fuse_projections(self) -> int:
        """Pack projections that read the same input into one GEMM (call after the weights are loaded).

        Per block: self-attention q/k/v, cross-attention text k/v (and I2V image k/v). State-dict keys
        and values are unchanged (the Linears keep views of the packed weights). Returns the number of
        packed groups.
        """
        return fuse_model_projections(self)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`."""
        unfuse_model_projections(self)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
