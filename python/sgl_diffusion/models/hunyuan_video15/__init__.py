"""HunyuanVideo-1.5 (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-*) native model."""

from .transformer import HunyuanVideo15Transformer3DModel, HunyuanVideo15TransformerConfig

__all__ = ["HunyuanVideo15Transformer3DModel", "HunyuanVideo15TransformerConfig"]
