"""Caption features for the Z-Image DiT from transformers' Qwen3 (the checkpoint's ``text_encoder``).

Each prompt is wrapped in the tokenizer's own chat template as one user turn with the generation prompt
(``enable_thinking=True``: no empty reasoning block), tokenized with padding to ``max_sequence_length``
(truncating longer ones), and run through the encoder with its padding mask. The hidden states of the
second-to-last layer at the real (unpadded) tokens are the prompt's caption features: one row per token,
so prompts differ in length.

This is ``ZImagePipeline._encode_prompt`` step for step, so the features equal diffusers' bit for bit when
a prompt is encoded alone (diffusers encodes a request's prompt and its negative prompt in separate calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["HIDDEN_STATE_LAYER", "chat_prompt", "encode_prompts"]

#: Which hidden states the DiT was trained on: the output of the encoder's second-to-last layer.
HIDDEN_STATE_LAYER = -2


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as the one user turn of the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


@torch.no_grad()
def encode_prompts(
    text_encoder: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_sequence_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Caption features of ``prompts``, encoded together as one padded batch.

    Args:
        text_encoder: transformers ``Qwen3Model``.
        tokenizer: the checkpoint's Qwen tokenizer (with its chat template).
        prompts: one string per sample (an empty prompt is allowed: the template's tokens remain).
        max_sequence_length: tokens per templated prompt, padding and truncation included.
        device: where to run the encoder (default: the encoder's device).
        dtype: dtype of the returned features (default: the encoder's).

    Returns:
        One ``(tokens_i, hidden)`` tensor per prompt.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be at least 1, got {max_sequence_length}")
    device = torch.device(device) if device is not None else text_encoder.device
    dtype = dtype or text_encoder.dtype
    tokens = tokenizer(
        [chat_prompt(tokenizer, p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device).bool()
    output = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hidden = output.hidden_states[HIDDEN_STATE_LAYER]
    return [hidden[i][mask[i]].to(dtype) for i in range(len(prompts))]
