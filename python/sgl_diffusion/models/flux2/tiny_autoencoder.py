"""fal's tiny autoencoder for FLUX.2 (`fal/FLUX.2-Tiny-AutoEncoder`, `_class_name` ``Flux2TinyAutoEncoder``).

What the published repository holds: a diffusers-style folder, ``config.json`` (``_class_name``
``Flux2TinyAutoEncoder``, an ``auto_map`` naming its remote-code module ``flux2_tiny_autoencoder.py``) and
``diffusion_pytorch_model.safetensors``. We never import that module: this is our own implementation of the
architecture it describes, with the same module tree, so the checkpoint's keys load by name:

* ``tiny_vae``: a TAESD-style ``AutoencoderTiny`` (diffusers' class) with ``latent_channels / 4`` (32) latent
  channels at 8x: pixels in [-1, 1] <-> 32-channel latents;
* ``extra_encoder``: a 4x4 stride-2 convolution 32 -> 128 channels (one more 2x step: 16x in all), then
  ``residual_encoder`` (conv 3x3, GroupNorm(8), SiLU, conv 3x3) added to its own input;
* ``extra_decoder``: the mirror image, a 4x4 stride-2 transposed convolution 128 -> 32 channels, then
  ``residual_decoder`` added to its input, then ``tiny_vae``'s decoder.

Its latents are FLUX.2's *denoiser* latents: 128 channels (32 VAE channels x 2x2 patches) at 16x, already
normalised by the BatchNorm statistics of FLUX.2's own VAE. So the pipeline hands it the packed latents as they
come out of the denoising loop (unpacked to (B, 128, h, w), no BatchNorm (de)normalisation, no 2x2 unpatchify),
and its encoder gives reference-image latents in that same space. That is how SGLang drives it
(``Flux2FinetunedPipelineConfig``: identity scale and shift, patchified latents, after BatchNorm denormalisation
was found to wash its images out) and how Modular MAX's port decodes the packed tokens directly. The config's
``scaling_factor`` (0.13025), ``latent_magnitude`` and ``latent_shift`` are carried by ``AutoencoderTiny`` but
act in neither ``encode`` nor ``decode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderTiny
from torch import nn

from ...config_dict import config_from_dict

#: What the pipeline's 2x2 patches add to the inner autoencoder's compression (``extra_encoder``'s stride).
PATCH = 2
#: Groups of the residual branches' GroupNorm (fixed in the published architecture).
GROUPS = 8


@dataclasses.dataclass(frozen=True)
class Flux2TinyAutoEncoderConfig:
    """The fields of the published ``config.json`` (defaults: its values)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "silu"
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 0.13025

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the frozen dataclass hashable.
        for name in (
            "encoder_block_out_channels",
            "decoder_block_out_channels",
            "num_encoder_blocks",
            "num_decoder_blocks",
        ):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.latent_channels % (PATCH * PATCH) or (self.latent_channels // (PATCH * PATCH)) % GROUPS:
            raise ValueError(
                f"latent_channels must be 4 x a multiple of {GROUPS} (the inner autoencoder has a quarter of them, "
                f"normalised in {GROUPS} groups), got {self.latent_channels}"
            )

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along a side: the inner autoencoder's 2x steps, then ``extra_encoder``'s stride."""
        return 2 ** (len(self.encoder_block_out_channels) - 1) * PATCH


def _residual_branch(channels: int) -> nn.Sequential:
    """conv 3x3, GroupNorm, SiLU, conv 3x3 over latents of `channels` channels (the checkpoint keys its weights
    0, 1 and 3: the SiLU holds none)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.GroupNorm(GROUPS, channels),
        nn.SiLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


class Flux2TinyAutoEncoder(nn.Module):
    """Pixels in [-1, 1] <-> FLUX.2's normalised, 2x2-patchified denoiser latents (see the module docstring)."""

    def __init__(self, config: Flux2TinyAutoEncoderConfig) -> None:
        super().__init__()
        self.config = config
        inner = config.latent_channels // (PATCH * PATCH)
        self.tiny_vae = AutoencoderTiny(
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            encoder_block_out_channels=config.encoder_block_out_channels,
            decoder_block_out_channels=config.decoder_block_out_channels,
            act_fn=config.act_fn,
            latent_channels=inner,
            upsampling_scaling_factor=config.upsampling_scaling_factor,
            num_encoder_blocks=config.num_encoder_blocks,
            num_decoder_blocks=config.num_decoder_blocks,
            latent_magnitude=config.latent_magnitude,
            latent_shift=config.latent_shift,
            force_upcast=config.force_upcast,
            scaling_factor=config.scaling_factor,
        )
        # kernel 4, stride 2, padding 1: exactly halves (encoder) or doubles (decoder) each side.
        self.extra_encoder = nn.Conv2d(inner, config.latent_channels, kernel_size=4, stride=PATCH, padding=1)
        self.extra_decoder = nn.ConvTranspose2d(config.latent_channels, inner, kernel_size=4, stride=PATCH, padding=1)
        self.residual_encoder = _residual_branch(config.latent_channels)
        self.residual_decoder = _residual_branch(inner)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Flux2TinyAutoEncoder:
        """From the published ``config.json`` (its ``auto_map`` names the remote code we do not run)."""
        return cls(config_from_dict(Flux2TinyAutoEncoderConfig, config, inert=("auto_map",)))

    def enable_tiling(self) -> None:
        """Refused: diffusers' `AutoencoderTiny` tiling writes 4-channel latents (its TAESD default), not these;
        and the tiny decoder needs a fraction of the memory FLUX.2's VAE does."""
        raise ValueError(
            "--vae-tiling: the tiny autoencoder (Flux2TinyAutoEncoder) decodes whole images; leave --vae-tiling off with it"
        )

    @classmethod
    def latent_interface(cls, config: Mapping[str, Any]) -> dict[str, int]:
        """The latents it takes and gives, in `loading.vae.latent_interface`'s terms: the denoiser's."""
        parsed = config_from_dict(Flux2TinyAutoEncoderConfig, config, inert=("auto_map",))
        return {
            "latent channels": parsed.latent_channels,
            "spatial compression": parsed.spatial_compression,
            "temporal compression": 1,
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.extra_decoder.weight.dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, latent_channels, H/16, W/16)."""
        inner = self.tiny_vae.encode(pixels, return_dict=False)[0]
        latents = self.extra_encoder(inner)
        return latents + self.residual_encoder(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) -> (B, 3, 16h, 16w), nominally in [-1, 1] (not clamped)."""
        inner = self.extra_decoder(latents)
        inner = inner + self.residual_decoder(inner)
        return self.tiny_vae.decode(inner, return_dict=False)[0]
