"""Pieces every family's stages share: per-request noise, per-row expansion, guided forwards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..runtime.request import Request


def draw_noise(requests: Sequence[Request], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise, `num_outputs` samples of `shape` per request, each request from its own CPU
    generator seeded with its seed: a request's noise (and so its output) does not depend on its batch,
    and equals what diffusers draws for the same seed (`randn_tensor` with a CPU generator).

    `dtype` must be the dtype the reference pipeline draws in (FLUX: the transformer's; Wan: float32):
    torch's CPU sampler may take a different path per dtype (torch 2.11 does for bf16), so drawing in
    float32 and casting is not always the same noise."""
    noise = []
    for request in requests:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise.append(torch.randn((request.num_outputs, *shape), generator=generator, dtype=dtype))
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


#: Up to this many image/video tokens per sample, running the conditional and unconditional branches
#: as one batch-2 forward beats two batch-1 forwards (smaller GEMMs and attention leave the GPU partly
#: idle). Measured on an H100 with Wan2.1-1.3B: batch 2 is 6 % faster at 4 680 tokens, 2.5 % at 9 360,
#: 3.5 % at 17 160; FLUX.1-dev 13 % at 1 024 tokens, 4 % at 2 304 (benches/results/wan-forward.md,
#: flux-forward.md). Above the largest measured size batching only doubles activation memory.
CFG_BATCH_MAX_TOKENS = 17160


def use_batched_cfg(mode: str, tokens: int) -> bool:
    """Whether to run both guidance branches in one forward (`--cfg-batching auto|on|off`)."""
    if mode == "auto":
        return tokens <= CFG_BATCH_MAX_TOKENS
    return mode == "on"


def guided_forward(
    forward: Callable[..., torch.Tensor],
    *,
    rows: dict[str, torch.Tensor | None],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    fixed: dict[str, Any],
    batched: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's conditional and unconditional predictions.

    `rows` are batch-first inputs both branches share (latents, timesteps), `cond`/`uncond` the
    batch-first inputs that differ (prompt embeddings), `fixed` inputs without a batch dimension
    (position ids). Batched, the branches are stacked along the batch dimension into one forward.
    """
    if not batched:
        return forward(**rows, **cond, **fixed), forward(**rows, **uncond, **fixed)
    stacked_rows = {key: None if value is None else torch.cat([value, value]) for key, value in rows.items()}
    stacked = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
    both = forward(**stacked_rows, **stacked, **fixed)
    positive, negative = both.chunk(2)
    return positive, negative
