"""Wan (Wan2.1 T2V/I2V, Wan2.2 TI2V-5B and A14B) native model."""

from .transformer import WanTransformer3DModel, WanTransformerConfig

__all__ = ["WanTransformer3DModel", "WanTransformerConfig"]
