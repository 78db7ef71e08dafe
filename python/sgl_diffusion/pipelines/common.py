"""Pieces every family's stages share: per-request noise and per-row expansion."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..runtime.request import Request


def draw_noise(requests: Sequence[Request], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise, `num_outputs` samples of `shape` per request, each request from its own CPU
    generator seeded with its seed: a request's noise (and so its output) does not depend on its batch,
    and equals what diffusers draws for the same seed (`randn_tensor` with a CPU generator)."""
    noise = []
    for request in requests:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise.append(torch.randn((request.num_outputs, *shape), generator=generator, dtype=torch.float32))
    return torch.cat(noise)


def per_row(values: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repeats per-request rows (dim 0) once per output of each request."""
    counts = torch.tensor([r.num_outputs for r in requests], device=values.device)
    return values.repeat_interleave(counts, dim=0)


def shared_value(requests: Sequence[Request], field: str) -> object:
    """A field every request of a batch has in common (the scheduler batches by these)."""
    values = {getattr(r, field) for r in requests}
    if len(values) != 1:
        raise RuntimeError(f"the scheduler batched requests with different {field}: {sorted(map(str, values))}")
    return values.pop()
