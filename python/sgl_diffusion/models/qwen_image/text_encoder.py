"""Prompt embeddings for the Qwen-Image DiT from transformers' Qwen2.5-VL (text only).

Each prompt is wrapped in the chat template (:mod:`.prompt`), the whole batch is tokenized with padding
to its longest member, and the text model's last hidden states are taken. Per prompt, only the real
(unpadded) tokens are kept and the template's fixed prefix is dropped; the rest (the prompt, then the
template's closing tokens) is what the DiT attends to. Rows are zero-padded again to the longest kept
row, with a mask saying which rows are real.

The text encoder runs as transformers' ``Qwen2_5_VLForConditionalGeneration`` (loaded with
:func:`sgl_diffusion.loading.load_transformers_model`), exactly as diffusers calls it, so the embeddings
equal ``QwenImagePipeline.encode_prompt``'s bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .prompt import EDIT_TEMPLATE_PREFIX_TOKENS, MAX_PROMPT_TOKENS, PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS

__all__ = ["QwenPromptEmbeds", "encode_prompt_with_images", "encode_prompts"]


@dataclass(frozen=True)
class QwenPromptEmbeds:
    """What the DiT takes as text conditioning for a batch of prompts.

    Attributes:
        embeds: ``(B, T, hidden)`` hidden states, zero rows after each prompt's own length.
        mask: ``(B, T)`` int64, 1 for real rows, or None when no row is padding (then attention runs
            unmasked, as in the reference, and the exact fast kernels that take no mask can be used).
        lengths: each prompt's number of real rows (after the prefix crop and ``max_sequence_length``).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None
    lengths: tuple[int, ...]


def _pad_rows(rows: Sequence[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(len_i, hidden)`` rows zero-padded to ``length``, with their int64 ``(B, length)`` masks."""
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return embeds, mask


@torch.no_grad()
def encode_prompts(
    text_encoder: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_sequence_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    template: str = PROMPT_TEMPLATE,
    prefix_tokens: int = TEMPLATE_PREFIX_TOKENS,
) -> QwenPromptEmbeds:
    """Embed ``prompts`` for the DiT as ``QwenImagePipeline`` does (text-to-image).

    Args:
        text_encoder: transformers ``Qwen2_5_VLForConditionalGeneration``.
        tokenizer: the checkpoint's ``Qwen2Tokenizer`` (from its ``tokenizer/`` folder).
        prompts: one string per sample (an empty prompt is allowed).
        max_sequence_length: at most this many rows per prompt reach the DiT (1..1024; the reference's
            default for ``__call__`` is 512). Longer prompts are cut, as the reference cuts them.
        device: where to run the encoder (default: the encoder's device).
        dtype: dtype of the returned embeddings (default: the encoder's).
        template, prefix_tokens: the chat template and how many of its leading tokens to drop.

    Returns:
        The embeddings, their mask (None when every row is real) and each prompt's length.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if not 1 <= max_sequence_length <= MAX_PROMPT_TOKENS:
        raise ValueError(f"max_sequence_length must be in 1..{MAX_PROMPT_TOKENS}, got {max_sequence_length}")
    device = torch.device(device) if device is not None else text_encoder.device
    dtype = dtype or text_encoder.dtype

    # Truncation at prefix + 1024 tokens mirrors the reference; rows beyond max_sequence_length are cut
    # below, after the encoder has seen the full (up to 1024-token) prompt in context.
    tokens = tokenizer(
        [template.format(p) for p in prompts],
        max_length=MAX_PROMPT_TOKENS + prefix_tokens,
        padding=True,
        truncation=True,
        return_tensors="pt",
    ).to(device)
    output = text_encoder(
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        output_hidden_states=True,
        # Neither changes the hidden states: no KV cache to build, no vocabulary logits for every token.
        use_cache=False,
        logits_to_keep=1,
    )
    rows = _rows_after_prefix(output.hidden_states[-1], tokens.attention_mask, prefix_tokens)
    return _embeds([row[:max_sequence_length] for row in rows], dtype)


@torch.no_grad()
def encode_prompt_with_images(
    text_encoder: Any,
    processor: Any,
    text: str,
    images: Sequence[Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefix_tokens: int = EDIT_TEMPLATE_PREFIX_TOKENS,
) -> QwenPromptEmbeds:
    """Embed one already templated edit prompt with its reference images, as Qwen-Image-Edit(-Plus) does.

    Args:
        text_encoder: transformers ``Qwen2_5_VLForConditionalGeneration`` (vision tower included).
        processor: the checkpoint's processor (:mod:`.vision`), which expands each ``<|image_pad|>`` of
            ``text`` to that image's patch count and turns ``images`` into patches.
        text: the chat template filled in, one ``<|image_pad|>`` per image in ``images``, in order.
        images: PIL images, already resized to the size the pipeline conditions on.
        device, dtype, prefix_tokens: as for :func:`encode_prompts`.

    Returns:
        One row: the hidden states of every token after the prefix (the image tokens, then the instruction);
        the reference crops nothing else, so neither does this.
    """
    device = torch.device(device) if device is not None else text_encoder.device
    dtype = dtype or text_encoder.dtype
    inputs = processor(text=[text], images=list(images), padding=True, return_tensors="pt").to(device)
    output = text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return _embeds(_rows_after_prefix(output.hidden_states[-1], inputs["attention_mask"], prefix_tokens), dtype)


def _rows_after_prefix(hidden: torch.Tensor, attention_mask: torch.Tensor, prefix_tokens: int) -> list[torch.Tensor]:
    """Each row's real tokens (wherever padding sits), minus the template prefix."""
    keep = attention_mask.bool()
    rows = [hidden[i][keep[i]][prefix_tokens:] for i in range(hidden.shape[0])]
    if min(int(r.shape[0]) for r in rows) == 0:
        raise ValueError(
            f"a prompt has no tokens after the {prefix_tokens}-token template prefix: the tokenizer does not "
            "split the template as the checkpoint's does"
        )
    return rows


def _embeds(rows: Sequence[torch.Tensor], dtype: torch.dtype) -> QwenPromptEmbeds:
    lengths = tuple(int(r.shape[0]) for r in rows)
    embeds, mask = _pad_rows(rows, max(lengths))
    all_real = min(lengths) == max(lengths)
    return QwenPromptEmbeds(embeds.to(dtype=dtype), None if all_real else mask, lengths)
