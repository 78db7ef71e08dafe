"""Qwen-Image (Qwen/Qwen-Image, Qwen-Image-2512, Qwen-Image-Edit) native model and prompt encoding."""

from .text_encoder import QwenPromptEmbeds, encode_prompts
from .transformer import QwenImageTransformer2DModel, QwenImageTransformerConfig

__all__ = ["QwenImageTransformer2DModel", "QwenImageTransformerConfig", "QwenPromptEmbeds", "encode_prompts"]
