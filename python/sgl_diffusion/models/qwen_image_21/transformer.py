"""Native Qwen-Image 2.1 transformer: one stream of text and image tokens, block-causal attention.

Module attribute names mirror diffusers' ``QwenImage21Transformer2DModel``, so ``state_dict()`` keys are the
checkpoint's and a diffusers-format ``transformer/`` folder loads by name. Operation order (including where
values change dtype) follows the reference, because the goal is numerical parity with diffusers.

What differs from Qwen-Image (and why none of ``models/qwen_image`` is reused): single-stream blocks with
bias-free projections, one modulation shared by all blocks (scale and tanh-gate only, no shift), SwiGLU,
a zero-centred RMSNorm on the text input, a 3-axis RoPE over the *joint* sequence (text advances all axes,
an image block sits at one frame with a centred height/width grid), and block-causal attention: the
sequence is causal, each image block (condition images, the target image) is bidirectional inside.

Attention is decomposed as diffusers' default ``QwenImage21AttnProcessor`` does it (exact, no flex): one
call per prefix segment (a text run with a causal triangle over its own keys; a condition-image block
over every key up to its end) and one for the target image over every key. The target's call carries no
mask unless prompts are padded, so mask-less kernels (flash-attn) serve the bulk of the work.

With ``causal_condition`` (every published checkpoint), text and condition-image tokens are modulated
from ``t = 0`` and attend only to earlier tokens, so their keys and values are the same at every step:
:class:`PrefixCache` keeps them from the first step and later steps compute only the target's tokens, as
diffusers' ``use_kv_cache=True`` (its default) does.

Shapes: ``B`` batch, ``S`` joint tokens, ``D`` inner dim, ``H`` heads, ``Dh`` head dim.
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
from ...layers.norms import LayerNormNoAffine

__all__ = [
    "PrefixCache",
    "QwenImage21Transformer2DModel",
    "QwenImage21TransformerConfig",
    "token_layout",
]

#: Each vision-language image slot stands for a 2x2 group of latent tokens.
IMG_TOKENS_PER_SLOT = 4
#: Sinusoid width fed to the timestep MLP (fixed by the architecture, not in config.json).
_TIME_PROJ_DIM = 256
#: RoPE table size: positions 0..8191 and -1024..-1 (the centred image grid reaches below zero).
_ROPE_POSITIVE = 8192
_ROPE_NEGATIVE = 1024
_ROPE_THETA = 10000

#: (frames, rows, columns) of one image block, in latent tokens.
ImageShape = tuple[int, int, int]


@dataclass(frozen=True)
class QwenImage21TransformerConfig:
    """The fields of a Qwen-Image 2.1 ``transformer/config.json`` (defaults = diffusers')."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, ...] = field(default=(16, 56, 56))
    eps: float = 1e-6
    causal_condition: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim="
                f"{self.attention_head_dim}: RoPE rotates every channel of a head"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> QwenImage21TransformerConfig:
        return config_from_dict(cls, cfg)


class DiffusersRMSNorm(nn.Module):
    """diffusers' ``RMSNorm`` (q/k norm) in its own operation order: the variance in float32, the
    normalised value multiplied by the weight in the input's dtype (fp32 weights) or the weight's (half)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return x.to(self.weight.dtype) * self.weight
        return (x * self.weight).to(input_dtype)


class ZeroCenterRMSNorm(nn.Module):
    """RMSNorm whose checkpoint weight stores ``scale - 1``; computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps)
        return (x * rrms * (self.weight.float() + 1)).to(input_dtype)


class TextProjection(nn.Module):
    def __init__(self, context_in_dim: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.text_norm = ZeroCenterRMSNorm(context_in_dim, eps=eps)
        self.in_layer = nn.Linear(context_in_dim, hidden_size, bias=False)
        self.out_layer = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """diffusers' ``TimestepEmbedding`` without biases: ``linear_2(silu(linear_1(x)))``."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepProjEmbeddings(nn.Module):
    """Sinusoid of ``1000 * t`` (cos first, then sin) into the timestep MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(_TIME_PROJ_DIM, dim)

    @staticmethod
    def sinusoid(timestep: torch.Tensor) -> torch.Tensor:
        half = _TIME_PROJ_DIM // 2
        # Built on the CPU as the reference builds its buffer, then moved: the same float32 values.
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32, device="cpu") / half)
        args = (1000.0 * timestep.float())[:, None] * freqs[None].to(timestep.device)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(timestep.dtype)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.sinusoid(timestep).to(dtype))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gate_layer(x)) * self.proj(x))


class FinalNorm(nn.Module):
    """The output adaptive norm: scale only (``linear`` maps to ``D``, not ``2D``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        self.norm = LayerNormNoAffine(dim, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, target_mask: torch.Tensor | None) -> torch.Tensor:
        scale = self.linear(F.silu(temb).to(x.dtype))
        return self.norm(x) * (1 + select_modulation_rows(scale, target_mask))


def select_modulation_rows(params: torch.Tensor, target_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample modulation over the token axis. With ``causal_condition``, ``params`` has ``B + 1`` rows,
    the last from ``t = 0``: target-image tokens take their sample's row, every other token the last."""
    if target_mask is None:
        return params.unsqueeze(1)
    real, zero = params[:-1].unsqueeze(1), params[-1:].unsqueeze(0)
    return torch.where(target_mask.view(1, -1, 1), real, zero)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Complex rotation of ``(B, S, H, Dh)`` channel pairs by ``freqs`` ``(S, Dh/2)``, in float32."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(1)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


@dataclass
class PrefixCache:
    """Each block's keys and values of the prefix (text and condition images), taken at the first step.

    Valid only with ``causal_condition``: prefix tokens are modulated from ``t = 0`` and never attend to the
    target, so their keys and values do not change between steps. One cache per guidance branch and rows.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def filled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of the joint sequence comes from, shared by every sample of a batch.

    ``image_mask`` marks latent-token positions (``S``), ``segments`` the prefix split into ``(start, end,
    is_text)`` runs, ``prefix_len`` where the target image starts, ``frame/row/column`` the RoPE positions.
    """

    image_mask: torch.Tensor
    target_mask: torch.Tensor
    segments: tuple[tuple[int, int, bool], ...]
    prefix_len: int
    positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def token_layout(slot_mask: torch.Tensor, img_shapes: Sequence[ImageShape]) -> TokenLayout:
    """The joint layout from the vision-language sequence's image slots (``slot_mask``, one row, text
    positions False, with the target's slots appended) and each image block's latent grid (condition
    images first, the target last), as diffusers' ``build_token_metadata``, prefix segments and RoPE."""
    device = slot_mask.device
    repeats = torch.where(slot_mask, IMG_TOKENS_PER_SLOT, 1)
    image_mask = torch.repeat_interleave(slot_mask, repeats)
    is_image = image_mask.tolist()
    total = len(is_image)
    block_lengths = [math.prod(shape) for shape in img_shapes]
    if sum(block_lengths) != sum(is_image):
        raise ValueError(
            f"img_shapes accounts for {sum(block_lengths)} image tokens but the image slots mark {sum(is_image)}"
        )
    block_id = [-1] * total
    frame: list[int] = []
    rows: list[int] = []
    columns: list[int] = []
    cursor = position = 0
    for block, (_, height, width) in enumerate(img_shapes):
        start = is_image.index(True, cursor)
        text_len = start - cursor
        frame.extend(range(position, position + text_len))
        rows.extend(range(position, position + text_len))
        columns.extend(range(position, position + text_len))
        position += text_len
        cursor = start + height * width
        block_id[start:cursor] = [block] * (height * width)
        frame.extend([position] * (height * width))
        rows.extend(h for h in range(-(height - height // 2), height // 2) for _ in range(width))
        columns.extend(w for _ in range(height) for w in range(-(width - width // 2), width // 2))
        position += max(height, width)
    if cursor < total:
        tail = range(position, position + total - cursor)
        frame.extend(tail)
        rows.extend(tail)
        columns.extend(tail)

    target_len = block_lengths[-1]
    prefix_len = total - target_len
    if not all(is_image[prefix_len:]):
        raise ValueError("the target image's tokens must close the joint sequence")
    segments: list[tuple[int, int, bool]] = []
    start = 0
    for index in range(1, prefix_len + 1):
        if index == prefix_len or block_id[index] != block_id[start]:
            segments.append((start, index, block_id[start] < 0))
            start = index
    target_mask = torch.zeros(total, dtype=torch.bool, device=device)
    target_mask[prefix_len:] = True

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return TokenLayout(
        image_mask=image_mask,
        target_mask=target_mask,
        segments=tuple(segments),
        prefix_len=prefix_len,
        positions=(as_tensor(frame), as_tensor(rows), as_tensor(columns)),
    )


class QwenImage21Rope(nn.Module):
    """3-axis RoPE tables (built lazily on the device in use: the module is created on the meta device)."""

    def __init__(self, axes_dim: Sequence[int]) -> None:
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self._tables: dict[torch.device, list[torch.Tensor]] = {}

    @staticmethod
    def _table(dim: int) -> torch.Tensor:
        inv = 1.0 / torch.pow(_ROPE_THETA, torch.arange(0, dim, 2, device="cpu").to(torch.float32).div(dim))

        def params(index: torch.Tensor) -> torch.Tensor:
            freqs = torch.outer(index, inv)
            return torch.polar(torch.ones_like(freqs), freqs)

        positive = torch.arange(_ROPE_POSITIVE, device="cpu")
        negative = torch.arange(_ROPE_NEGATIVE, device="cpu").flip(0) * -1 - 1
        return torch.cat([params(positive), params(negative)], dim=0)

    def forward(self, positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        device = positions[0].device
        tables = self._tables.get(device)
        if tables is None:
            tables = [self._table(dim).to(device) for dim in self.axes_dim]
            self._tables[device] = tables
        return torch.cat([table[index] for table, index in zip(tables, positions, strict=True)], dim=-1)


class QwenImage21Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        # ModuleList for the checkpoint key `to_out.0` (diffusers keeps a dropout at index 1).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.norm_q = DiffusersRMSNorm(head_dim, eps)
        self.norm_k = DiffusersRMSNorm(head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        segments: Sequence[tuple[int, int, bool]] | None,
        key_valid: torch.Tensor | None,
        backend: str,
        cache: PrefixCache | None,
        layer: int,
    ) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (-1, self.head_dim))
        k = self.to_k(x).unflatten(-1, (-1, self.head_dim))
        v = self.to_v(x).unflatten(-1, (-1, self.head_dim))
        q = apply_rope(self.norm_q(q).to(v.dtype), rope)
        k = apply_rope(self.norm_k(k).to(v.dtype), rope)

        if segments is None:
            # Cached step: `x` holds only the target's tokens; its keys follow the stored prefix.
            if cache is None:
                raise ValueError("a step without prefix segments needs the prefix cache")
            k = torch.cat([cache.keys[layer], k], dim=1)
            v = torch.cat([cache.values[layer], v], dim=1)
            mask = None if key_valid is None else key_valid[:, None, None, :]
            out = attention(q, k, v, backend=backend, attn_mask=mask)
            return self.to_out[0](out)

        prefix_len = segments[-1][1] if segments else 0
        if cache is not None:
            # clone: a slice of a batch-1 tensor is a view that would pin the whole step's keys.
            cache.keys.append(k[:, :prefix_len].clone())
            cache.values.append(v[:, :prefix_len].clone())
        outputs = []
        for start, end, is_text in segments:
            # Each segment sees every key before it and its own block; a text run only its causal part.
            seg_mask: torch.Tensor | None = None
            if is_text:
                length = end - start
                seg_mask = torch.cat(
                    [
                        torch.ones(length, start, dtype=torch.bool, device=q.device),
                        torch.tril(torch.ones(length, length, dtype=torch.bool, device=q.device)),
                    ],
                    dim=1,
                )[None, None]
            if key_valid is not None:
                valid = key_valid[:, None, None, :end]
                seg_mask = valid if seg_mask is None else seg_mask & valid
            outputs.append(attention(q[:, start:end], k[:, :end], v[:, :end], backend=backend, attn_mask=seg_mask))
        target_mask = None if key_valid is None else key_valid[:, None, None, :]
        outputs.append(attention(q[:, prefix_len:], k, v, backend=backend, attn_mask=target_mask))
        return self.to_out[0](torch.cat(outputs, dim=1))


class QwenImage21TransformerBlock(nn.Module):
    """Single-stream block; its scales and gates are sliced from the model's shared modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        self.img_norm1 = LayerNormNoAffine(dim, eps)
        self.attn = QwenImage21Attention(dim, heads, head_dim, eps)
        self.img_norm2 = LayerNormNoAffine(dim, eps)
        self.img_mlp = SwiGLU(dim, dim * mlp_ratio)

    @staticmethod
    def _modulate(
        x: torch.Tensor, params: torch.Tensor, target_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale, gate = params.chunk(2, dim=-1)
        return x * (1 + select_modulation_rows(scale, target_mask)), select_modulation_rows(gate, target_mask)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        target_mask: torch.Tensor | None,
        attn_args: tuple[Any, ...],
    ) -> torch.Tensor:
        mod1, mod2 = modulation.chunk(2, dim=-1)
        modulated, gate1 = self._modulate(self.img_norm1(x), mod1, target_mask)
        x = x + gate1.tanh() * self.attn(modulated, *attn_args)
        modulated, gate2 = self._modulate(self.img_norm2(x), mod2, target_mask)
        x = x + gate2.tanh() * self.img_mlp(modulated)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class QwenImage21Transformer2DModel(nn.Module):
    """Qwen-Image 2.1's DiT (see the module docstring).

    Args:
        config: the ``transformer/config.json`` fields.
        attention_backend: a name for :func:`sgl_diffusion.layers.attention.attention`, checked here.
    """

    #: What `--enable-torch-compile` compiles (`runtime/compile.repeated_blocks`).
    _repeated_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)

    def __init__(self, config: QwenImage21TransformerConfig, attention_backend: str | None = "torch_sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = resolve_attention_backend(attention_backend)
        dim = config.inner_dim
        self.out_channels = config.out_channels or config.in_channels
        self.pos_embed = QwenImage21Rope(config.axes_dims_rope)
        self.time_text_embed = TimestepProjEmbeddings(dim)
        self.txt_in = TextProjection(config.context_in_dim, dim, config.eps)
        self.img_in = nn.Linear(config.in_channels * config.patch_size**2, dim, bias=False)
        # Shared by every block: [attention scale, gate, MLP scale, gate]; index 1 is the checkpoint's key.
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))
        self.transformer_blocks = nn.ModuleList(
            [
                QwenImage21TransformerBlock(
                    dim, config.num_attention_heads, config.attention_head_dim, config.mlp_ratio, config.eps
                )
                for _ in range(config.num_layers)
            ]
        )
        self.norm_out = FinalNorm(dim, config.eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * self.out_channels, bias=False)

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any] | QwenImage21TransformerConfig, attention_backend: str | None = "torch_sdpa"
    ) -> QwenImage21Transformer2DModel:
        config = cfg if isinstance(cfg, QwenImage21TransformerConfig) else QwenImage21TransformerConfig.from_dict(cfg)
        return cls(config, attention_backend=attention_backend)

    @staticmethod
    def tokens_per_sample(hidden_states: torch.Tensor) -> int:
        """Latent tokens of one sample ``(B, N, C)``: what the engine's CFG-batching and CUDA-graph size
        rules count."""
        return int(hidden_states.shape[1])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: Sequence[Sequence[ImageShape]],
        img_mask: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> torch.Tensor:
        """The prediction for every latent token of ``hidden_states`` (condition images, then the target).

        Args:
            hidden_states: ``(B, N, in_channels)`` packed latents, condition images first, the target last.
            encoder_hidden_states: ``(B, T, context_in_dim)`` the vision-language encoder's sequence.
            timestep: ``(B,)`` in ``[0, 1]``.
            img_shapes: ``[blocks]`` (or the reference's ``[[blocks]] * B``): each image block's
                ``(frames, rows, columns)``, condition images first, the target last; shared by the batch.
            img_mask: ``(B, >= T)`` bool, True at the encoder's image slots (each stands for 2x2 latent
                tokens); only row 0 and the first ``T`` columns are read (samples share a layout). None:
                no condition image.
            encoder_hidden_states_mask: ``(B, T)`` valid text positions (None: all valid).
            prefix_cache: an empty cache to fill at this step, or a filled one: this step then computes
                only the target's tokens (needs ``causal_condition``).
        """
        config = self.config
        batch = hidden_states.shape[0]
        text_len = encoder_hidden_states.shape[1]
        blocks = list(img_shapes[0]) if not isinstance(img_shapes[0][0], int) else list(img_shapes)  # type: ignore[arg-type]
        shapes: list[ImageShape] = [tuple(int(v) for v in shape) for shape in blocks]  # type: ignore[misc]
        if prefix_cache is not None and not config.causal_condition:
            raise ValueError("prefix_cache needs causal_condition=True: only then are prefix keys step-independent")

        if hidden_states.shape[1] != sum(math.prod(shape) for shape in shapes):
            raise ValueError(
                f"img_shapes accounts for {sum(math.prod(shape) for shape in shapes)} latent tokens but "
                f"hidden_states has {hidden_states.shape[1]}"
            )
        device = hidden_states.device
        text_slots = (
            torch.zeros(text_len, dtype=torch.bool, device=device)
            if img_mask is None
            else img_mask[0, :text_len].to(device=device, dtype=torch.bool)
        )
        target_tokens = math.prod(shapes[-1])
        slot_mask = torch.cat(
            [text_slots, torch.ones(target_tokens // IMG_TOKENS_PER_SLOT, dtype=torch.bool, device=device)]
        )
        layout = token_layout(slot_mask, shapes)

        hidden_states = self.img_in(hidden_states)
        text = self.txt_in(encoder_hidden_states)
        # Each image slot of the encoder's sequence becomes 4 latent tokens; text tokens stay where they are.
        repeats = torch.where(slot_mask, IMG_TOKENS_PER_SLOT, 1)
        joint = torch.cat([text, text.new_zeros(batch, target_tokens // IMG_TOKENS_PER_SLOT, text.shape[2])], dim=1)
        joint = joint.repeat_interleave(repeats, dim=1)
        joint[:, layout.image_mask] = hidden_states
        rope = self.pos_embed(layout.positions)

        timestep = timestep.to(hidden_states.dtype)
        target_mask: torch.Tensor | None = None
        if config.causal_condition:
            # An extra t = 0 row: text and condition-image tokens modulate from it.
            timestep = torch.cat([timestep, timestep.new_zeros(1)], dim=0)
            target_mask = layout.target_mask
        temb = self.time_text_embed(timestep, hidden_states.dtype)
        modulation = self.modulation(temb)

        key_valid: torch.Tensor | None = None
        if encoder_hidden_states_mask is not None:
            # Padded text positions are never keys; text positions of the joint sequence are the encoder's
            # non-image positions, in order.
            key_valid = torch.ones(batch, layout.image_mask.shape[0], dtype=torch.bool, device=device)
            key_valid[:, ~layout.image_mask] = encoder_hidden_states_mask.bool()[:, ~text_slots]

        segments: Sequence[tuple[int, int, bool]] | None = layout.segments
        cache = prefix_cache
        if prefix_cache is not None and prefix_cache.filled:
            prefix_len = layout.prefix_len
            joint = joint[:, prefix_len:]
            rope = rope[prefix_len:]
            target_mask = target_mask[prefix_len:] if target_mask is not None else None
            segments = None

        for index, block in enumerate(self.transformer_blocks):
            joint = block(
                joint, modulation, target_mask, (rope, segments, key_valid, self.attention_backend, cache, index)
            )
        joint = self.norm_out(joint, temb, target_mask)
        return self.proj_out(joint)

    def extra_repr(self) -> str:
        return f"attention_backend={self.attention_backend!r}"
