"""HunyuanVideo's two prompt encodings: Llama hidden states of the templated prompt, and CLIP's pooled embedding.

What diffusers' ``HunyuanVideoPipeline.encode_prompt`` computes, per prompt:

* Llama (``text_encoder``, a ``LlamaModel``): the prompt inside :data:`PROMPT_TEMPLATE` (a system turn asking
  for a video description, then the user turn), tokenized with padding to ``max_sequence_length`` plus the
  template's prefix and truncated there; the third-to-last hidden states (:data:`HIDDEN_STATE_FROM_END`); the
  first :data:`TEMPLATE_CROP` rows (BOS and the template up to the user turn) cut off. What stays is the
  prompt's tokens and the closing ``<|eot_id|>``, then padding, which a mask marks.
* CLIP (``text_encoder_2``): the prompt alone, padded to 77 tokens, ``pooler_output``.

The tokenizer is read from ``tokenizer.json`` as it is (transformers' ``PreTrainedTokenizerFast``): the
checkpoint names ``LlamaTokenizerFast``, which transformers 5 rebuilds from vocab and merges with another
pre-tokenizer, changing the ids of a byte-level Llama-3 vocabulary. It pads on the right, as the template crop
assumes (the template's tokens come first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CLIP_MAX_LENGTH",
    "HIDDEN_STATE_FROM_END",
    "PROMPT_TEMPLATE",
    "TEMPLATE_CROP",
    "PromptEncoding",
    "encode_prompt",
    "load_llama_tokenizer",
]

#: The reference's prompt template (the user's prompt replaces ``{}``).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
#: Tokens cut off the front of the Llama hidden states: BOS and the template up to the user's prompt, with
#: Llama-3's vocabulary (hard-coded in the reference as well).
TEMPLATE_CROP = 95
#: The Llama hidden states the DiT reads: the third from the end (the last two layers are skipped).
HIDDEN_STATE_FROM_END = 3
#: CLIP's context length.
CLIP_MAX_LENGTH = 77


def load_llama_tokenizer(folder: Path) -> Any:
    """The checkpoint's Llama tokenizer, ``tokenizer.json`` as it is (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass(frozen=True)
class PromptEncoding:
    """One prompt's encodings, in the encoders' dtypes.

    Attributes:
        tokens: ``(L, hidden)`` Llama features of the prompt's real tokens (the rows the reference's mask keeps
            after the crop), at most ``max_sequence_length``.
        pooled: ``(clip_hidden,)`` CLIP's pooled embedding.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor


@torch.no_grad()
def llama_features(
    text_encoder: Any, tokenizer: Any, prompt: str, max_sequence_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, mask)`` of one prompt as the reference computes them: ``(max_sequence_length, hidden)`` Llama
    hidden states after the template crop, and their ``(max_sequence_length,)`` int64 mask (1: a real token)."""
    inputs = tokenizer(
        [PROMPT_TEMPLATE.format(prompt)],
        max_length=max_sequence_length + TEMPLATE_CROP,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    if len(hidden) <= HIDDEN_STATE_FROM_END:
        raise ValueError(
            f"the Llama text encoder has {len(hidden) - 1} layers; HunyuanVideo reads hidden_states[-{HIDDEN_STATE_FROM_END}]"
        )
    return hidden[-HIDDEN_STATE_FROM_END][0, TEMPLATE_CROP:], mask[0, TEMPLATE_CROP:]


@torch.no_grad()
def clip_pooled(text_encoder: Any, tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """CLIP's pooled embedding of one prompt, ``(hidden,)``."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device), output_hidden_states=False).pooler_output[0]


def encode_prompt(
    llama: Any, llama_tokenizer: Any, clip: Any, clip_tokenizer: Any, prompt: str, max_sequence_length: int,
    device: torch.device,
) -> PromptEncoding:  # fmt: skip
    """Both encodings of one prompt; the Llama features keep the prompt's real tokens only.

    One prompt at a time, as the reference encodes a request's prompt: every prompt is padded to the same
    length, so a batch would give the same features but for the last bits of differently blocked GEMMs.
    """
    features, mask = llama_features(llama, llama_tokenizer, prompt, max_sequence_length, device)
    return PromptEncoding(tokens=features[mask.bool()], pooled=clip_pooled(clip, clip_tokenizer, prompt, device))
