"""GLM-Image (zai-org/GLM-Image) native DiT; the prior and glyph encoder run through transformers."""

from .transformer import GlmImageTransformer2DModel, GlmImageTransformerConfig

__all__ = ["GlmImageTransformer2DModel", "GlmImageTransformerConfig"]
