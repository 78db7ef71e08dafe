"""Z-Image (Tongyi-MAI/Z-Image-Turbo) native model and prompt encoding."""

from .text_encoder import encode_prompts
from .transformer import ZImageTransformer2DModel, ZImageTransformerConfig

__all__ = ["ZImageTransformer2DModel", "ZImageTransformerConfig", "encode_prompts"]
