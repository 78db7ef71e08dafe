"""Real-valued rotary position embedding (RoPE) as FLUX uses it.

FLUX gives every token a small integer id vector (3 axes for FLUX.1: (unused/index, row, column)),
rotates each axis with its own slice of ``head_dim``, and stores the rotation as interleaved pairs:
channel ``2i`` and ``2i+1`` of a head form one complex number. Tables are computed in float64 (then
rounded to float32) like the reference, because fp32 angles for positions in the thousands lose
several bits in cos/sin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["apply_interleaved_rotary", "multi_axis_rope_tables", "rope_tables_1d"]


def _freq_dtype(device: torch.device) -> torch.dtype:
    # MPS and NPU have no float64; those devices fall back to float32 (same choice as the reference).
    return torch.float32 if device.type in ("mps", "npu") else torch.float64


def rope_tables_1d(
    dim: int, positions: torch.Tensor, theta: float = 10000.0, *, freqs_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for one axis, each ``(len(positions), dim)`` float32, pairs interleaved.

    Frequency ``i`` is ``theta ** (-2i/dim)``; each angle is repeated twice so the table lines up
    with the (real, imag) interleaving of the channels. Angles are computed in float64 where the device
    has it (FLUX), or in ``freqs_dtype`` when given: HunyuanVideo's reference computes them in float32.
    """
    if dim % 2 != 0:
        raise ValueError(f"rotary axis dim must be even, got {dim}")
    fdtype = _freq_dtype(positions.device) if freqs_dtype is None else freqs_dtype
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=fdtype, device=positions.device) / dim))
    angles = torch.outer(positions.to(fdtype), inv_freq)  # (S, dim/2)
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos, sin


def multi_axis_rope_tables(
    ids: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(S, sum(axes_dims))`` for position ids ``(S, n_axes)``.

    Axis ``a`` occupies the next ``axes_dims[a]`` channels of every head, in order.
    """
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids must be (seq, {len(axes_dims)}), got {tuple(ids.shape)}")
    # Positions are rounded through float32 first, as the reference does; integer ids are exact anyway.
    pos = ids.float()
    cos_parts, sin_parts = [], []
    for axis, axis_dim in enumerate(axes_dims):
        cos, sin = rope_tables_1d(axis_dim, pos[:, axis], theta)
        cos_parts.append(cos)
        sin_parts.append(sin)
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, seq, heads, head_dim)`` by tables ``(seq, head_dim)``.

    For each channel pair (a, b) the result is (a*cos - b*sin, b*cos + a*sin), evaluated in float32
    and cast back to ``x.dtype`` (bf16 inputs would otherwise lose precision in the products). The
    tables repeat each frequency for both channels of a pair, so only every other column is read.
    Computing the two halves straight into the output (no stacked rotated copy, no float32 copies of
    ``x``) moves half the memory of the textbook form and gives bit-identical results.
    """
    cos = cos[None, :, None, 0::2].to(x.device)
    sin = sin[None, :, None, 0::2].to(x.device)
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    pairs = out.unflatten(-1, (-1, 2))
    pairs[..., 0] = a * cos - b * sin
    pairs[..., 1] = b * cos + a * sin
    return out
