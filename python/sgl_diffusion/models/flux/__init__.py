"""FLUX.1 (black-forest-labs/FLUX.1-dev, -schnell) native model."""

from .transformer import FluxTransformer2DModel, FluxTransformerConfig

__all__ = ["FluxTransformer2DModel", "FluxTransformerConfig"]
