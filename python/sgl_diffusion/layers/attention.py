"""The single attention entry point every native model calls.

Layout contract (chosen to match how DiT blocks naturally hold projections, and what
flash-attention style kernels take without a transpose):

* inputs ``q``, ``k``, ``v``: ``(batch, seq, heads, head_dim)``; ``k``/``v`` may have a different
  ``seq`` than ``q`` (cross attention);
* output: ``(batch, seq_q, heads * head_dim)``, in ``q``'s dtype, ready for the output projection.

Backends are looked up by name so that a request/server flag (``--attention-backend``) can pick one
without the model code knowing which kernels were built. Only ``torch_sdpa`` exists today; the other
well-known names are reserved so that asking for them gives a clear "not available yet" error instead
of a silent fallback (a silent fallback would make benchmark numbers lie).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_ATTENTION_BACKEND",
    "AttentionBackend",
    "AttentionFn",
    "attention",
    "available_attention_backends",
    "register_attention_backend",
    "resolve_attention_backend",
    "set_sdpa_kernel_preference",
]


class AttentionBackend(str, Enum):
    """Every backend name the engine knows about, built or not.

    Being a ``str`` enum, members compare equal to their plain names, so either form can be passed
    around in configs.
    """

    TORCH_SDPA = "torch_sdpa"
    # Reserved: planned kernels. Listed so the resolver can say "not available yet" for them.
    FLASH_ATTN = "fa"
    FLASH_ATTN3 = "fa3"
    SAGE_ATTN = "sage"
    SLIDING_TILE = "sliding_tile"
    VIDEO_SPARSE = "vsa"


DEFAULT_ATTENTION_BACKEND = AttentionBackend.TORCH_SDPA.value

# (q, k, v, attn_mask) with q/k/v in (batch, seq, heads, head_dim) -> (batch, seq_q, heads*head_dim)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _expand_key_padding_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Turn a per-key ``(batch, seq_k)`` mask into the ``(batch, 1, 1, seq_k)`` form SDPA broadcasts.

    Any other shape is passed through untouched (SDPA itself validates it against
    ``(batch, heads, seq_q, seq_k)``). Boolean masks mean "True = attend"; float masks are additive.
    """
    if attn_mask is None:
        return None
    if attn_mask.ndim == 2 and attn_mask.shape == (q.shape[0], k.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


#: SDPA kernel order on Hopper: cuDNN's fused attention measures 615 TFLOP/s on an H100 against 370 for
#: SDPA's FlashAttention-2 (both exact), so it goes first; torch falls back down the list when a
#: kernel cannot take the inputs. "default" keeps torch's own choice (for benchmarks and parity runs).
SDPA_KERNEL_PREFERENCES = ("cudnn", "default")
_sdpa_preference = "cudnn"


def set_sdpa_kernel_preference(preference: str) -> None:
    global _sdpa_preference
    if preference not in SDPA_KERNEL_PREFERENCES:
        raise ValueError(f"SDPA kernel preference must be one of {SDPA_KERNEL_PREFERENCES}, got {preference!r}")
    _sdpa_preference = preference


@functools.cache
def _is_hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _sdpa_kernels(q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    if _sdpa_preference != "cudnn" or not q.is_cuda or not _is_hopper_or_newer(q.device):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    mask = _expand_key_padding_mask(attn_mask, q, k)
    # SDPA wants (batch, heads, seq, head_dim). Transposed views (no copy) keep the strides the same as
    # diffusers' native path, so on CPU torch picks the same kernel and results are bit-identical.
    with _sdpa_kernels(q):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
        )
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


_REGISTRY: dict[str, AttentionFn] = {AttentionBackend.TORCH_SDPA.value: _torch_sdpa}


def register_attention_backend(name: str, fn: AttentionFn, *, override: bool = False) -> None:
    """Make a backend callable by name (used by optional kernel packages when they import)."""
    key = str(getattr(name, "value", name))
    if key in _REGISTRY and not override:
        raise ValueError(f"attention backend '{key}' is already registered")
    _REGISTRY[key] = fn


def available_attention_backends() -> list[str]:
    """Names that can actually run in this process, sorted."""
    return sorted(_REGISTRY)


def resolve_attention_backend(name: str | AttentionBackend | None) -> str:
    """Validate a backend name; ``None`` means the default (``torch_sdpa``).

    Raises ``ValueError`` naming the available backends when the name is unknown or known but not
    built, so a bad CLI flag fails at startup rather than deep inside a forward pass.
    """
    if name is None:
        return DEFAULT_ATTENTION_BACKEND
    key = str(getattr(name, "value", name))
    if key in _REGISTRY:
        return key
    available = ", ".join(available_attention_backends())
    known = {b.value for b in AttentionBackend}
    if key in known:
        raise ValueError(f"attention backend '{key}' is not available yet; available: {available}")
    raise ValueError(f"unknown attention backend '{key}'; available: {available}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = DEFAULT_ATTENTION_BACKEND,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention (scale ``1/sqrt(head_dim)``, no dropout, not causal).

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``.
        backend: a name accepted by :func:`resolve_attention_backend`.
        attn_mask: optional; ``(batch, seq_k)`` key mask (bool: True = keep, float: additive) or any
            shape broadcastable to ``(batch, heads, seq_q, seq_k)``.

    Returns:
        ``(batch, seq_q, heads * head_dim)`` in ``q.dtype``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects (batch, seq, heads, head_dim) tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    fn = _REGISTRY.get(backend)
    if fn is None:
        # Resolve only on the slow path so the hot path is a single dict lookup; this raises the
        # user-facing error message.
        fn = _REGISTRY[resolve_attention_backend(backend)]
    return fn(q, k, v, attn_mask)
