"""The Wan VAE decoder's per-position row op: bias, residual add, channel RMS norm and SiLU in one pass.

The native Wan VAE decoder (``sgl_diffusion.models.wan.vae``) keeps its activations channels-last, so a
clip is a ``(T*H*W, C)`` row matrix, and runs its convolutions without bias. Everything between two
convolutions is then one op per row (position) over its ``C`` channels::

    y = x [+ bias] [+ residual]                        # the conv's bias, the residual block's shortcut
    y = y / max(||y||_2, eps) * sqrt(C) * weight       # WanRMS_norm (F.normalize * scale * gamma), optional
    y = silu(y)                                        # optional

Unfused that is up to five passes over a full-resolution video activation (and float32 temporaries
inside ``F.rms_norm``); the kernel reads ``x`` (and ``residual``) once and writes the result once, in
place if asked (``out=x``).

Numerics: the kernel computes in float32 and rounds once to ``x.dtype``; :func:`vae_rows_reference`
is that arithmetic in torch. The norm is diffusers' form (``F.normalize``'s clamp of the L2 norm at
``eps``, then ``* sqrt(C) * gamma``), so all-zero rows stay zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import check_block, check_launchable, jit, next_power_of_2, on_device, tl

__all__ = ["NORM_EPS", "vae_rows", "vae_rows_reference"]

#: ``F.normalize``'s default: the L2 norm of a row is clamped at this value (diffusers' ``WanRMS_norm``).
NORM_EPS = 1e-12
#: Elements per program: rows are grouped so that short rows (the VAE's C is 96 to 1024) fill a block.
_ROWS_BLOCK = 4096
_MAX_ROWS_PER_PROGRAM = 64


def _check(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty channel (last) dim, got {tuple(x.shape)}")
    c = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (c,):
            raise ValueError(f"{name} must be ({c},), got {tuple(param.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(
            f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )


def vae_rows_reference(
    x: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    silu: bool = False,
    eps: float = NORM_EPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[silu](norm(x [+ bias] [+ residual]))`` over the last (channel) dim, in torch.

    Args:
        x: ``(..., C)`` rows, e.g. ``a.permute(0, 2, 3, 4, 1)`` of a channels-last-3d ``(1, C, T, H, W)``
            activation (a contiguous view).
        weight: ``(C,)`` norm gain ``gamma``; None skips the norm. The norm of a row ``y`` is
            ``y / max(||y||_2, eps) * sqrt(C) * weight``.
        bias: ``(C,)`` added to every row first (a convolution's bias); None for none.
        residual: a tensor of ``x``'s shape added after the bias; None for none.
        silu: apply SiLU last.
        eps: the clamp of the row norm (``F.normalize``'s ``eps``).
        out: optional destination of ``x``'s shape and dtype; may be ``x`` itself (in place). Returned.

    Every operand is upcast, the whole op computed in float32 and rounded once to ``x.dtype``.
    """
    _check(x, weight, bias, residual, out)
    y = x.to(torch.float32, copy=True)  # our own float32 buffer: the steps below work in place
    if bias is not None:
        y += bias.float()
    if residual is not None:
        y += residual.float()
    if weight is not None:
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min_(eps)
        y *= x.shape[-1] ** 0.5 / norm
        y *= weight.float()
    if silu:
        F.silu(y, inplace=True)
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


@jit
def _vae_rows_kernel(
    x_ptr,
    bias_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    n_rows,
    C,
    norm_scale,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    NORM: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program handles BLOCK_R rows (positions) of C contiguous channels; int64 offsets because
    # full-resolution video activations exceed 2**31 elements.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # Masked lanes hold 0 and add nothing to the sum of squares.
        inv = norm_scale / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * inv[:, None] * w[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def vae_rows(
    x: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    silu: bool = False,
    eps: float = NORM_EPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel: same arguments and result as :func:`vae_rows_reference` (float32 math, one rounding).

    ``x`` and ``residual`` are read as contiguous ``(N, C)`` row matrices (copied first if they are not
    contiguous); ``weight`` / ``bias`` may have any float dtype. ``out`` must be contiguous and may be
    ``x`` (or ``residual``) itself: every program reads its rows completely before writing them. Without
    ``out`` the result is a new contiguous tensor.
    """
    _check(x, weight, bias, residual, out)
    if out is not None and not out.is_contiguous():
        raise ValueError("out must be contiguous (rows of C channels)")
    check_launchable(_vae_rows_kernel, x, weight, bias, residual, out)
    if not x.is_contiguous():
        x = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    c = x.shape[-1]
    n_rows = x.numel() // c
    if n_rows == 0:
        return out
    block_c = next_power_of_2(c)
    check_block(block_c, f"{c} channels")
    block_r = max(1, min(_MAX_ROWS_PER_PROGRAM, _ROWS_BLOCK // block_c))
    # Unused pointer slots get x: the constexpr flags keep the kernel from reading them.
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    with on_device(x):
        _vae_rows_kernel[(-(-n_rows // block_r),)](
            x,
            b,
            residual if residual is not None else x,
            w,
            out,
            n_rows,
            c,
            c**0.5,
            eps,
            HAS_BIAS=bias is not None,
            HAS_RES=residual is not None,
            NORM=weight is not None,
            SILU=silu,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4 if block_r * block_c <= _ROWS_BLOCK else 8,
        )
    return out
