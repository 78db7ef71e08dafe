"""Native diffusion model implementations (load diffusers-format checkpoints by their key names)."""

from .flux import FluxTransformer2DModel, FluxTransformerConfig
from .wan import WanTransformer3DModel, WanTransformerConfig

__all__ = ["FluxTransformer2DModel", "FluxTransformerConfig", "WanTransformer3DModel", "WanTransformerConfig"]
