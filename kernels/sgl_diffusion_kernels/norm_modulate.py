"""LayerNorm / RMSNorm followed by the adaLN modulation ``y * (1 + scale) + shift``, in one pass.

A DiT block normalises its residual stream and modulates it with per-sample (or, for Wan2.2 TI2V,
per-token) shift/scale vectors before every attention and MLP. Unfused that is ``F.layer_norm`` plus
three elementwise kernels, each reading and writing the whole ``(B, S, D)`` activation; the kernel
reads ``x`` once and writes the result once.

Numerics: the kernel normalises and modulates in float32 and rounds once, to ``x.dtype``.
:func:`norm_modulate_reference` with ``precision="float32"`` is the same arithmetic in torch (and
exactly what the Wan blocks compute); ``precision="input"`` evaluates each op in the input dtype
the way FLUX / diffusers write it (``F.layer_norm(x) * (1 + scale) + shift``), rounding after each op.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ._triton import (
    block_num_warps,
    broadcast_strides,
    check_block,
    check_launchable,
    jit,
    next_power_of_2,
    on_device,
    tl,
)

__all__ = ["NormKind", "Precision", "norm_modulate", "norm_modulate_reference"]

NormKind = Literal["layer", "rms"]
#: "float32": compute in float32, round once to x.dtype; "input": each op in the operands' dtype.
Precision = Literal["float32", "input"]
NORM_KINDS: tuple[str, ...] = ("layer", "rms")
PRECISIONS: tuple[str, ...] = ("float32", "input")


def _check_options(norm: str, precision: str = "float32") -> None:
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def norm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    norm: NormKind,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    precision: Precision = "float32",
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` over the last dim, in torch.

    Args:
        x: ``(B, S, D)`` activations.
        shift, scale: broadcastable to ``x``: ``(B, 1, D)`` per sample or ``(B, S, D)`` per token.
        norm: ``"layer"`` (LayerNorm, optional affine ``weight``/``bias``) or ``"rms"`` (RMSNorm,
            optional ``weight``; ``bias`` must be None).
        eps: added to the variance / mean square.
        precision: ``"float32"`` upcasts every operand, computes in float32 and rounds once to
            ``x.dtype``; ``"input"`` runs ``F.layer_norm``/``F.rms_norm`` on ``x`` as is and the
            modulation in the operands' dtype (one rounding per op in bf16).
    """
    _check_options(norm, precision)
    dim = (x.shape[-1],)
    if norm == "rms" and bias is not None:
        raise ValueError("RMSNorm has no bias")
    if precision == "float32":
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        if norm == "layer":
            y = F.layer_norm(x.float(), dim, w, b, eps)
        else:
            y = F.rms_norm(x.float(), dim, w, eps)
        return (y * (1 + scale.float()) + shift.float()).to(x.dtype)
    if norm == "layer":
        y = F.layer_norm(x, dim, weight, bias, eps)
    else:
        y = F.rms_norm(x, dim, weight, eps)
    return y * (1 + scale) + shift


@jit
def _norm_modulate_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    seq_len,
    dim,
    x_sb,
    x_ss,
    shift_sb,
    shift_ss,
    shift_sd,
    scale_sb,
    scale_ss,
    scale_sd,
    out_sb,
    out_ss,
    eps,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per token; int64 row arithmetic because B*S*D of a 720p video exceeds int32 offsets.
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim

    x = tl.load(x_ptr + b * x_sb + s * x_ss + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        y = x * tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    else:
        mean = tl.sum(x, axis=0) / dim
        centered = tl.where(mask, x - mean, 0.0)  # masked lanes must not add (0 - mean)^2
        y = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / dim + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    shift = tl.load(shift_ptr + b * shift_sb + s * shift_ss + cols * shift_sd, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + b * scale_sb + s * scale_ss + cols * scale_sd, mask=mask, other=0.0)
    out = y * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(out_ptr + b * out_sb + s * out_ss + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    norm: NormKind,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel: same arguments as :func:`norm_modulate_reference` (always float32 math).

    ``x`` may be any ``(B, S, D)`` view whose last dim is contiguous (e.g. a token slice of a larger
    sequence); ``shift``/``scale`` may be any strided views (e.g. from ``.unbind`` of a stacked
    modulation tensor) and are read in place. Returns a new contiguous tensor of ``x.dtype``.
    """
    _check_options(norm)
    if norm == "rms" and bias is not None:
        raise ValueError("RMSNorm has no bias")
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, seq, dim), got {tuple(x.shape)}")
    batch, seq_len, dim = x.shape
    shift_strides = broadcast_strides(shift, x.shape, "shift")
    scale_strides = broadcast_strides(scale, x.shape, "scale")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(param.shape)}")
    check_launchable(_norm_modulate_kernel, x, shift, scale, weight, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((batch, seq_len, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = next_power_of_2(dim)
    check_block(block, f"hidden size {dim}")
    # Unused pointer slots get x: the constexpr flags keep the kernel from reading them.
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    with on_device(x):
        _norm_modulate_kernel[(batch * seq_len,)](
            x,
            shift,
            scale,
            w,
            b,
            out,
            seq_len,
            dim,
            x.stride(0),
            x.stride(1),
            *shift_strides,
            *scale_strides,
            out.stride(0),
            out.stride(1),
            eps,
            IS_RMS=norm == "rms",
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_D=block,
            num_warps=block_num_warps(block),
        )
    return out
