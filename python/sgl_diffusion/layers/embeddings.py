"""Timestep (and guidance) embeddings shared by the FLUX-style DiTs (FLUX.1, FLUX.2).

Both embed a scalar per sample the way diffusers' ``Timesteps(flip_sin_to_cos=True,
downscale_freq_shift=0)`` + ``TimestepEmbedding`` do: a float32 ``[cos | sin]`` sinusoid, cast to the
activation dtype, then Linear -> SiLU -> Linear (checkpoint keys ``linear_1``, ``linear_2``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TIME_PROJ_DIM", "TimestepMLP", "sinusoidal_embedding"]

#: Sinusoid width fed to the timestep/guidance MLPs (fixed by the architectures, not in config.json).
TIME_PROJ_DIM = 256


def sinusoidal_embedding(values: torch.Tensor, dim: int = TIME_PROJ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """``(B,) -> (B, dim)`` float32 embedding laid out as ``[cos | sin]``.

    Frequencies are ``max_period ** (-i / (dim/2))`` for ``i < dim/2`` (no frequency offset), computed
    in float32 with the reference's operation order, so the values are its bits.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(exponent / half)
    args = values[:, None].float() * freqs[None, :]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear (keys ``linear_1``, ``linear_2``); FLUX.2's have no biases."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
