"""Query/key RMSNorm followed by interleaved rotary embedding (RoPE), in one pass.

FLUX normalises q and k per head (weight ``(Dh,)``); Wan normalises them over all ``H * Dh``
channels of a token ("rms_norm_across_heads", weight ``(H * Dh,)``). Both then rotate channel pairs
``(2i, 2i+1) = (a, b)`` to ``(a*cos - b*sin, b*cos + a*sin)`` with float32 tables ``(S, Dh)`` that
repeat each frequency for both channels of a pair. Unfused that is ``F.rms_norm`` plus a rotation
that reads the normalised tensor again; the kernel reads ``x`` once and writes the result once.

Numerics: the kernel normalises and rotates in float32 and rounds once to ``x.dtype``.
:func:`qk_norm_rope_reference` reproduces what the model code did before fusion: ``F.rms_norm`` in
the input dtype (rounded), then the rotation evaluated in float32 and rounded again.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ._triton import check_block, check_launchable, jit, next_power_of_2, on_device, tl

__all__ = ["NormOver", "qk_norm_rope", "qk_norm_rope_reference"]

#: "head": RMS over each head's Dh channels (FLUX); "all": over the token's H*Dh channels (Wan).
NormOver = Literal["head", "all"]
NORM_OVER: tuple[str, ...] = ("head", "all")


def _check(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, norm_over: str):
    if norm_over not in NORM_OVER:
        raise ValueError(f"norm_over must be one of {NORM_OVER}, got {norm_over!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, seq, heads, head_dim), got {tuple(x.shape)}")
    _, seq_len, heads, head_dim = x.shape
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even (RoPE rotates channel pairs), got {head_dim}")
    width = head_dim if norm_over == "head" else heads * head_dim
    if weight.shape != (width,):
        raise ValueError(f"weight must be ({width},) for norm_over={norm_over!r}, got {tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither (norm only)")
    for name, table in (("cos", cos), ("sin", sin)):
        if table is not None and table.shape != (seq_len, head_dim):
            raise ValueError(f"{name} must be (seq, head_dim) = {(seq_len, head_dim)}, got {tuple(table.shape)}")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )


def qk_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    eps: float,
    norm_over: NormOver,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm (learned ``weight``) then interleaved RoPE, in torch.

    Args:
        x: ``(B, S, H, Dh)``, e.g. ``linear(h).unflatten(-1, (H, Dh))``.
        weight: ``(Dh,)`` for ``norm_over="head"``, ``(H * Dh,)`` for ``norm_over="all"``.
        cos, sin: ``(S, Dh)`` tables (float32; each frequency repeated for both channels of a pair),
            or both None for the norm alone.
        out: optional ``(B, S, H, Dh)`` destination with ``x``'s dtype (may be a slice of a larger
            tensor, e.g. the text or image part of a joint sequence); returned.

    The norm runs in ``x.dtype`` (``F.rms_norm``, float32 accumulation inside) and is rounded; the
    rotation is evaluated in float32 (x promoted by the float32 tables) and rounded to ``x.dtype``.
    """
    _check(x, weight, cos, sin, norm_over)
    if out is not None:
        _check_out(out, x)
    if norm_over == "head":
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:
        y = F.rms_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), weight, eps).unflatten(-1, x.shape[-2:])
    if cos is None or sin is None:
        return y if out is None else out.copy_(y)
    # Only every other column is read: both channels of a pair share the angle.
    cos = cos[None, :, None, 0::2].to(y.device)
    sin = sin[None, :, None, 0::2].to(y.device)
    a, b = y.unflatten(-1, (-1, 2)).unbind(-1)
    if out is None:
        out = torch.empty_like(y)
    pairs = out.unflatten(-1, (-1, 2))
    pairs[..., 0] = a * cos - b * sin
    pairs[..., 1] = b * cos + a * sin
    return out


@jit
def _qk_norm_rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    seq_len,
    heads,
    head_dim,
    x_sb,
    x_ss,
    x_sh,
    cos_ss,
    sin_ss,
    out_sb,
    out_ss,
    out_sh,
    eps,
    NORM_ALL: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One program per token: a (heads, pairs) tile; the two channels of each pair are loaded as
    # separate stride-2 vectors so the rotation needs no shuffles (both loads hit the same lines).
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    h = tl.arange(0, BLOCK_H)[:, None]
    p = tl.arange(0, BLOCK_P)[None, :]
    pair_mask = p < head_dim // 2
    mask = (h < heads) & pair_mask

    x_off = x_ptr + b * x_sb + s * x_ss + h * x_sh + 2 * p
    xa = tl.load(x_off, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_off + 1, mask=mask, other=0.0).to(tl.float32)
    sq = xa * xa + xb * xb
    if NORM_ALL:
        rstd = tl.rsqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / (heads * head_dim) + eps)
        w_off = w_ptr + h * head_dim + 2 * p
        w_mask = mask
    else:
        rstd = tl.rsqrt(tl.sum(sq, axis=1) / head_dim + eps)[:, None]
        w_off = w_ptr + 2 * p
        w_mask = pair_mask
    ya = xa * rstd * tl.load(w_off, mask=w_mask, other=0.0).to(tl.float32)
    yb = xb * rstd * tl.load(w_off + 1, mask=w_mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        c = tl.load(cos_ptr + s * cos_ss + 2 * p, mask=pair_mask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + s * sin_ss + 2 * p, mask=pair_mask, other=0.0).to(tl.float32)
        rot_a = ya * c - yb * sn
        rot_b = yb * c + ya * sn
        ya = rot_a
        yb = rot_b

    out_off = out_ptr + b * out_sb + s * out_ss + h * out_sh + 2 * p
    tl.store(out_off, ya.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_off + 1, yb.to(out_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    eps: float,
    norm_over: NormOver,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel: same arguments as :func:`qk_norm_rope_reference` (float32 math, one rounding).

    ``x`` may be any ``(B, S, H, Dh)`` view with a contiguous last dim (e.g. the q part of a packed
    qkv projection). Without ``out`` the result is a new contiguous tensor.
    """
    _check(x, weight, cos, sin, norm_over)
    if out is not None:
        _check_out(out, x)
        if out.stride(-1) != 1:
            raise ValueError("out must have a contiguous last dim")
    check_launchable(_qk_norm_rope_kernel, x, weight, cos, sin, out)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    batch, seq_len, heads, head_dim = x.shape
    block_h, block_p = next_power_of_2(heads), next_power_of_2(head_dim // 2)
    check_block(block_h * block_p * 2, f"{heads} heads of {head_dim}")
    weight = weight.contiguous()
    has_rope = cos is not None and sin is not None
    if has_rope:
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    with on_device(x):
        _qk_norm_rope_kernel[(batch * seq_len,)](
            x,
            weight,
            cos if has_rope else weight,  # unused when HAS_ROPE is off
            sin if has_rope else weight,
            out,
            seq_len,
            heads,
            head_dim,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0) if has_rope else 0,
            sin.stride(0) if has_rope else 0,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            eps,
            NORM_ALL=norm_over == "all",
            HAS_ROPE=has_rope,
            BLOCK_H=block_h,
            BLOCK_P=block_p,
            num_warps=max(1, min(8, block_h * block_p // 256)),
        )
    return out
