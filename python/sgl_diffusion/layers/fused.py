"""Fused elementwise ops around the DiT linears: the model code's one entry point for them.

Each function runs the Triton kernel of the ``sgl_diffusion_kernels`` package (``kernels/`` in this
repository, ``pip install ./kernels``) when all of these hold:

* the activation is a CUDA tensor,
* ``sgl_diffusion_kernels`` and ``triton`` import,
* fused kernels are enabled (:func:`set_fused_kernels`, or ``SGL_DIFFUSION_FUSED_KERNELS=0`` in the
  environment to start disabled -- for measuring what the kernels buy),
* torch is not tracing the call (``torch.compiler.is_compiling()``): under ``torch.compile`` the torch
  reference is traced instead, so that inductor fuses it with its neighbours itself,
* no input needs a gradient (the kernels have no backward).

Otherwise the kernel's torch reference runs. The references live in ONE place, next to their kernels
in ``sgl_diffusion_kernels`` (which imports without Triton), so CPU runs, parity tests and the GPU
kernel tests all use the same code. They are written to be bit-identical to the model code they
replaced: ``precision="float32"`` is Wan's arithmetic (upcast, compute in float32, round once),
``precision="input"`` is FLUX's (each op in the activation dtype).

The kernels always compute in float32 and round once, whatever ``precision`` asks for: on CUDA the
FLUX path therefore rounds less often than diffusers does (differences of about one bf16 ulp).

The engine's own wheel does not bundle ``sgl_diffusion_kernels``. Without it this module falls back to
the unfused expressions the models used before fusion (:func:`_unfused_norm_modulate` & co., kept
bit-identical to the references by ``tests/python/test_kernels.py``) and logs one WARNING the first
time a CUDA tensor comes by -- where the missing kernels cost time. On CPU nothing is lost, so nothing
is logged.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch
import torch.nn.functional as F

from .rotary import apply_interleaved_rotary

try:
    from sgl_diffusion_kernels import gated_residual as _gated_residual_mod
    from sgl_diffusion_kernels import norm_modulate as _norm_modulate_mod
    from sgl_diffusion_kernels import qk_norm_rope as _qk_norm_rope_mod
    from sgl_diffusion_kernels import triton_available as _triton_available
except ImportError:  # the engine runs without the kernels package (see the module docstring)
    _KERNELS_INSTALLED = False
else:
    _KERNELS_INSTALLED = True

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_VAR",
    "fused_kernels_enabled",
    "gated_residual",
    "joint_qk_norm_rope",
    "norm_modulate",
    "qk_norm_rope",
    "set_fused_kernels",
]

#: Set to "0" to start with the fused kernels disabled (the references run everywhere).
ENV_VAR = "SGL_DIFFUSION_FUSED_KERNELS"

NormKind = Literal["layer", "rms"]
Precision = Literal["float32", "input"]
NormOver = Literal["head", "all"]


def _enabled_from_env(value: str | None) -> bool:
    return value is None or value.strip() != "0"


_enabled = _enabled_from_env(os.environ.get(ENV_VAR))
_warned = False


def set_fused_kernels(enabled: bool) -> None:
    """Turn the Triton kernels on or off for the whole process (off: the torch references run)."""
    global _enabled
    _enabled = bool(enabled)


def fused_kernels_enabled() -> bool:
    """The switch's state (the kernels also need CUDA tensors, the package and Triton to run)."""
    return _enabled


def _kernels_usable() -> bool:
    global _warned
    if _KERNELS_INSTALLED and _triton_available():
        return True
    if not _warned:
        _warned = True
        missing = "sgl-diffusion-kernels (pip install ./kernels)" if not _KERNELS_INSTALLED else "triton"
        logger.warning("fused Triton kernels are unavailable (%s is not installed): using the torch path", missing)
    return False


def _use_kernel(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    if not _enabled or x.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return False
    return _kernels_usable()


def norm_modulate(
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
    """``norm(x) * (1 + scale) + shift`` over the last dim of ``(B, S, D)`` ``x``; see
    ``sgl_diffusion_kernels.norm_modulate.norm_modulate_reference`` for the arguments."""
    if _use_kernel(x, shift, scale, weight, bias):
        return _norm_modulate_mod.norm_modulate(x, shift, scale, norm=norm, eps=eps, weight=weight, bias=bias)
    if _KERNELS_INSTALLED:
        return _norm_modulate_mod.norm_modulate_reference(
            x, shift, scale, norm=norm, eps=eps, weight=weight, bias=bias, precision=precision
        )
    return _unfused_norm_modulate(x, shift, scale, norm=norm, eps=eps, weight=weight, bias=bias, precision=precision)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, precision: Precision = "float32"
) -> torch.Tensor:
    """``x + y * gate`` (gate ``(B, 1, D)`` or ``(B, S, D)``); see
    ``sgl_diffusion_kernels.gated_residual.gated_residual_reference``."""
    if _use_kernel(x, y, gate):
        return _gated_residual_mod.gated_residual(x, y, gate)
    if _KERNELS_INSTALLED:
        return _gated_residual_mod.gated_residual_reference(x, y, gate, precision=precision)
    return _unfused_gated_residual(x, y, gate, precision=precision)


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
    """RMSNorm of ``(B, S, H, Dh)`` q or k (per head or across heads) then interleaved RoPE (skipped
    when ``cos``/``sin`` are None), optionally into ``out``; see
    ``sgl_diffusion_kernels.qk_norm_rope.qk_norm_rope_reference``."""
    if _use_kernel(x, weight):
        return _qk_norm_rope_mod.qk_norm_rope(x, weight, cos, sin, eps=eps, norm_over=norm_over, out=out)
    if _KERNELS_INSTALLED:
        return _qk_norm_rope_mod.qk_norm_rope_reference(x, weight, cos, sin, eps=eps, norm_over=norm_over, out=out)
    return _unfused_qk_norm_rope(x, weight, cos, sin, eps=eps, norm_over=norm_over, out=out)


def joint_qk_norm_rope(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_weight: torch.Tensor,
    img_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    head_dim: int,
    eps: float,
) -> torch.Tensor:
    """``rope(cat(rms(txt), rms(img)))`` for the q (or k) projections ``(B, T, H*Dh)`` and ``(B, N, H*Dh)``
    of a joint-attention block, as ``(B, T + N, H, Dh)``: each stream normed per head with its own weight,
    then rotated by its rows of the ``[text, image]`` tables ``(T + N, Dh)``.

    RoPE acts on each token independently, so rotating each stream with its rows equals rotating the
    concatenation (what FLUX-style references compute); writing both straight into their slices of one
    buffer saves the concatenation's copy.
    """
    n_txt = txt.shape[1]
    batch, n_img, inner = img.shape
    joint = img.new_empty(batch, n_txt + n_img, inner // head_dim, head_dim)
    qk_norm_rope(
        txt.unflatten(-1, (-1, head_dim)), txt_weight, cos[:n_txt], sin[:n_txt], eps=eps, norm_over="head",
        out=joint[:, :n_txt],
    )  # fmt: skip
    qk_norm_rope(
        img.unflatten(-1, (-1, head_dim)), img_weight, cos[n_txt:], sin[n_txt:], eps=eps, norm_over="head",
        out=joint[:, n_txt:],
    )  # fmt: skip
    return joint


# --------------------------------------------------------------------------------------------------
# Without the kernels package: the unfused model expressions (bit-identical to the references; no
# argument checking beyond torch's -- the package's references and kernels do that).
# --------------------------------------------------------------------------------------------------


def _unfused_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    norm: NormKind,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    precision: Precision,
) -> torch.Tensor:
    upcast = precision == "float32"
    h = x.float() if upcast else x
    if upcast:
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    dim = (x.shape[-1],)
    h = F.layer_norm(h, dim, weight, bias, eps) if norm == "layer" else F.rms_norm(h, dim, weight, eps)
    if upcast:
        return (h * (1 + scale.float()) + shift.float()).to(x.dtype)
    return h * (1 + scale) + shift


def _unfused_gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, precision: Precision):
    if precision == "float32":
        return (x.float() + y.float() * gate.float()).to(x.dtype)
    return x + gate * y


def _unfused_qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    eps: float,
    norm_over: NormOver,
    out: torch.Tensor | None,
) -> torch.Tensor:
    if norm_over == "head":
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:
        y = F.rms_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],), weight, eps).unflatten(-1, x.shape[-2:])
    if cos is not None and sin is not None:
        y = apply_interleaved_rotary(y, cos, sin)
    return y if out is None else out.copy_(y)
