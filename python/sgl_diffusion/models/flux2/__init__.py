"""FLUX.2 (black-forest-labs/FLUX.2-dev, FLUX.2-klein) native model and prompt encoding."""

from .text_encoder import KLEIN_PROMPT, MISTRAL_PROMPT, PromptFormat, encode_prompts, load_chat_tokenizer
from .transformer import Flux2Transformer2DModel, Flux2TransformerConfig

__all__ = [
    "KLEIN_PROMPT",
    "MISTRAL_PROMPT",
    "Flux2Transformer2DModel",
    "Flux2TransformerConfig",
    "PromptFormat",
    "encode_prompts",
    "load_chat_tokenizer",
]
