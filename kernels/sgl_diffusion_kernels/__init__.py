"""Fused Triton kernels for sgl-diffusion's DiTs and the Wan VAE decoder, each next to a pure-torch reference.

One module per kernel, named after it; each holds the Triton kernel, its launcher and
``<name>_reference`` (the semantics the kernel is tested against):

* :mod:`.norm_modulate` -- LayerNorm/RMSNorm + adaLN ``y * (1 + scale) + shift``;
* :mod:`.gated_residual` -- ``x + y * gate``;
* :mod:`.qk_norm_rope` -- q/k RMSNorm (per head or across heads) + interleaved RoPE;
* :mod:`.vae_rows` -- the Wan VAE decoder's row op: bias + residual + channel RMS norm + SiLU;
* :mod:`.block_sparse_attention` -- attention of 64-query blocks over listed 64-key blocks (sparse video attention).

The modules import without Triton (the references then still work); :func:`triton_available` says
whether the launchers can run. The functions are not re-exported here so that each module name keeps
meaning the module (``sgl_diffusion_kernels.norm_modulate.norm_modulate`` is the launcher).
"""

from __future__ import annotations

from . import block_sparse_attention, gated_residual, norm_modulate, qk_norm_rope, vae_rows
from ._triton import triton_available

__all__ = ["block_sparse_attention", "gated_residual", "norm_modulate", "qk_norm_rope", "triton_available", "vae_rows"]
__version__ = "0.1.0"
