"""HunyuanVideo (hunyuanvideo-community/HunyuanVideo, FastVideo/FastHunyuan-diffusers) native model."""

from .transformer import HunyuanVideoTransformer3DModel, HunyuanVideoTransformerConfig

__all__ = ["HunyuanVideoTransformer3DModel", "HunyuanVideoTransformerConfig"]
