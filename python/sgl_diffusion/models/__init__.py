"""Native diffusion model implementations (load diffusers-format checkpoints by their key names)."""

from .flux import FluxTransformer2DModel, FluxTransformerConfig

__all__ = ["FluxTransformer2DModel", "FluxTransformerConfig"]
