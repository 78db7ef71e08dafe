"""The gated residual add ``x + y * gate`` of adaLN-zero blocks, in one pass.

Every attention and MLP branch of a FLUX / Wan block ends with ``x + gate * branch(x)``; in Wan it is
also upcast to float32 and cast back, which costs two more passes over the activation unfused.

Numerics: the kernel computes in float32 and rounds once to ``x.dtype``.
:func:`gated_residual_reference` with ``precision="float32"`` is that arithmetic in torch (Wan's
``(x.float() + y * gate).type_as(x)``); ``precision="input"`` is FLUX / diffusers' ``x + gate * y``
in the operands' dtype.
"""

from __future__ import annotations

import torch

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
from .norm_modulate import PRECISIONS, Precision

__all__ = ["gated_residual", "gated_residual_reference"]


def gated_residual_reference(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, precision: Precision = "float32"
) -> torch.Tensor:
    """``x + y * gate`` in torch; ``gate`` broadcasts to ``x`` (``(B, 1, D)`` or ``(B, S, D)``).

    ``precision="float32"``: every operand upcast, one rounding to ``x.dtype`` at the end.
    ``precision="input"``: ``x + gate * y`` as torch evaluates it for the operands' dtypes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return (x.float() + y.float() * gate.float()).to(x.dtype)
    return x + gate * y


@jit
def _gated_residual_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    seq_len,
    dim,
    x_sb,
    x_ss,
    y_sb,
    y_ss,
    gate_sb,
    gate_ss,
    gate_sd,
    out_sb,
    out_ss,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(x_ptr + b * x_sb + s * x_ss + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * y_sb + s * y_ss + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_sb + s * gate_ss + cols * gate_sd, mask=mask, other=0.0).to(tl.float32)
    out = x + y * gate
    tl.store(out_ptr + b * out_sb + s * out_ss + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The fused kernel: ``x + y * gate`` in float32, one rounding to ``x.dtype``; a new contiguous tensor.

    ``x`` and ``y`` are ``(B, S, D)`` with a contiguous last dim (any other strides); ``gate`` is any
    view broadcastable to them and is read in place.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, seq, dim), got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    gate_strides = broadcast_strides(gate, x.shape, "gate")
    check_launchable(_gated_residual_kernel, x, y, gate)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    batch, seq_len, dim = x.shape
    out = torch.empty((batch, seq_len, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = next_power_of_2(dim)
    check_block(block, f"hidden size {dim}")
    with on_device(x):
        _gated_residual_kernel[(batch * seq_len,)](
            x,
            y,
            gate,
            out,
            seq_len,
            dim,
            x.stride(0),
            x.stride(1),
            y.stride(0),
            y.stride(1),
            *gate_strides,
            out.stride(0),
            out.stride(1),
            BLOCK_D=block,
            num_warps=block_num_warps(block),
        )
    return out
