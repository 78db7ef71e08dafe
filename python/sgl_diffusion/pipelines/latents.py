"""Latent code families share: per-request noise, FLUX-style 2x2 packing, Wan-style VAE statistics, and
decoding with a 2D VAE (FLUX.1's `AutoencoderKL`, which Z-Image uses too).

Kept in one module so that a family built from several of them (Qwen-Image: FLUX-style packing over a
Wan-style VAE) takes each from here instead of from another family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..runtime.request import Request


def request_generators(requests: Sequence[Request]) -> list[torch.Generator]:
    """One CPU generator per request, seeded with its seed (what diffusers' `generator=` argument is)."""
    return [torch.Generator("cpu").manual_seed(request.seed) for request in requests]


def draw_noise(
    requests: Sequence[Request],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Initial noise, `num_outputs` samples of `shape` per request, each request from its own CPU
    generator seeded with its seed: a request's noise (and so its output) does not depend on its batch,
    and equals what diffusers draws for the same seed (`randn_tensor` with a CPU generator). Pass
    `generators` (one per request) to keep drawing from them afterwards (e.g. a sampler's fresh noise).

    `dtype` must be the dtype the reference pipeline draws in (FLUX: the transformer's; Wan: float32):
    torch's CPU sampler may take a different path per dtype (torch 2.11 does for bf16), so drawing in
    float32 and casting is not always the same noise."""
    generators = request_generators(requests) if generators is None else generators
    noise = [
        torch.randn((request.num_outputs, *shape), generator=generator, dtype=dtype)
        for request, generator in zip(requests, generators, strict=True)
    ]
    return torch.cat(noise)


def video_latent_grid(request: Request, scale_temporal: int, scale_spatial: int) -> tuple[int, int, int]:
    """Latent frames, height and width of a video request: the VAE's temporal compression keeps the first frame
    alone (4k+1 frames -> k+1), its spatial compression divides both sides."""
    return (
        (request.num_frames - 1) // scale_temporal + 1,
        request.height // scale_spatial,
        request.width // scale_spatial,
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2x2 latent patches become tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a (latent) height and width."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (0, row, col) of each packed image token, for the rotary embedding."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def _statistics(
    latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel mean and 1/std, shaped to broadcast over `latents` (B, C, ...), in its dtype.
    Built as diffusers builds them (to the latents' dtype, then the reciprocal), so the rounding matches."""
    shape = (1, len(mean), *([1] * (latents.ndim - 2)))
    mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(std).view(shape).to(latents.device, latents.dtype)
    return mean_t, inv_std


def normalize_latents(
    latents: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, divide: bool = False
) -> torch.Tensor:
    """VAE latents to the denoiser's scale: `(x - mean) / std` per channel (Wan-style VAE statistics).
    Multiplied by 1/std as diffusers' Wan pipelines compute it, or divided by std (`divide`) as its
    Qwen-Image-Edit pipelines do: the two round differently."""
    mean_t, inv_std = _statistics(latents, mean, std)
    if divide:
        std_t = torch.tensor(std).view(mean_t.shape).to(latents.device, latents.dtype)
        return (latents - mean_t) / std_t
    return (latents - mean_t) * inv_std


def denormalize_latents(
    latents: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, multiply: bool = False
) -> torch.Tensor:
    """Inverse of `normalize_latents`, before decoding: `x * std + mean`, computed as diffusers' Wan-style
    pipelines do (dividing by 1/std), or multiplying by std (`multiply`) as its GLM-Image pipeline does: the two
    round differently."""
    mean_t, inv_std = _statistics(latents, mean, std)
    if multiply:
        std_t = torch.tensor(std).view(mean_t.shape).to(latents.device, latents.dtype)
        return latents * std_t + mean_t
    return latents / inv_std + mean_t


def decode_images(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """Latents already in the VAE's scale and dtype, `(B, C, H, W)`, to float32 pixels `(B, H, W, 3)` in
    [0, 1] with a 2D VAE (`AutoencoderKL`). One row at a time: bounded activation memory, and each image is
    independent of its batch."""
    images = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
    pixels = (torch.cat(images) * 0.5 + 0.5).clamp(0, 1)
    return pixels.cpu().permute(0, 2, 3, 1).float().numpy()
