"""Normalisation layers whose parameter names match diffusers checkpoints.

Both go through torch's functional kernels (``F.rms_norm`` / ``F.layer_norm``), which is what
``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` call, so results are bit-identical to the reference
in every dtype (the kernels accumulate in float32 for half types).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNormNoAffine", "RMSNorm"]


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale stored as ``weight`` (checkpoint key)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNormNoAffine(nn.Module):
    """LayerNorm over the last dim without weight/bias (adaLN supplies scale and shift).

    Has no parameters, so it contributes no checkpoint keys.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), None, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
