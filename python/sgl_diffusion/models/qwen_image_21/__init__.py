"""Qwen-Image 2.1 (Qwen/Qwen-Image-2.1) native model."""

from .transformer import PrefixCache, QwenImage21Transformer2DModel, QwenImage21TransformerConfig

__all__ = ["PrefixCache", "QwenImage21Transformer2DModel", "QwenImage21TransformerConfig"]
