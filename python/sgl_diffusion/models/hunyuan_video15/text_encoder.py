"""HunyuanVideo-1.5's two prompt encodings: Qwen2.5-VL hidden states of the chat-templated prompt, and ByT5
features of the prompt's quoted text (the "glyph" text the video should render).

What diffusers' ``HunyuanVideo15Pipeline.encode_prompt`` computes, per prompt:

* Qwen2.5-VL (``text_encoder``, a ``Qwen2_5_VLTextModel``): a chat of :data:`SYSTEM_MESSAGE` and the prompt
  (an empty prompt becomes one space) with the generation prompt, tokenized by the chat template with padding
  to :data:`MLLM_MAX_LENGTH` plus :data:`TEMPLATE_CROP` and truncated there; the third-to-last hidden states; the
  first :data:`TEMPLATE_CROP` rows cut off. What stays: the prompt's tokens and the template's closing turn, then
  padding, which a mask marks.
* ByT5 (``text_encoder_2``): the prompt's quoted spans (``"..."`` or ``“...”``; repeated ones once when there are
  several) as ``Text "a". Text "b". ``, padded to :data:`GLYPH_MAX_LENGTH` bytes; the encoder's last hidden
  states under their mask. A prompt without quotes has no glyph tokens (the reference passes zeros, masked out).

Only the real rows are kept (the reference's masks select the same rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "GLYPH_MAX_LENGTH",
    "HIDDEN_STATE_FROM_END",
    "MLLM_MAX_LENGTH",
    "SYSTEM_MESSAGE",
    "TEMPLATE_CROP",
    "PromptEncoding",
    "encode_prompt",
    "glyph_text",
]

#: The reference's system turn (its exact characters, spacing included: the template crop counts its tokens).
SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects: "
    "        1. The main content and theme of the video. "
    "        2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects. "
    "        3. Actions, events, behaviors temporal relationships, physical movement changes of the objects. "
    "        4. background environment, light, style and atmosphere. "
    "        5. camera angles, movements, and transitions used in the video."
)
#: Tokens cut off the front of the hidden states: the chat template's system turn and the user turn's header,
#: with Qwen2.5's vocabulary (hard-coded in the reference as well).
TEMPLATE_CROP = 108
#: The prompt tokens the reference keeps after the crop (its `tokenizer_max_length`).
MLLM_MAX_LENGTH = 1000
#: The hidden states the DiT reads: the third from the end (the last two layers are skipped).
HIDDEN_STATE_FROM_END = 3
#: ByT5's context length (bytes plus the end token).
GLYPH_MAX_LENGTH = 256

_QUOTED = re.compile(r"\"(.*?)\"|“(.*?)”")


def glyph_text(prompt: str) -> str | None:
    """The prompt's quoted spans as the glyph encoder reads them, or None when it has none."""
    spans = [straight or curly for straight, curly in _QUOTED.findall(prompt)]
    if len(spans) > 1:
        spans = list(dict.fromkeys(spans))  # repeated spans once, in first-seen order
    if not spans:
        return None
    return "".join(f'Text "{span}". ' for span in spans)


@dataclass(frozen=True)
class PromptEncoding:
    """One prompt's encodings, in the encoders' dtypes.

    Attributes:
        tokens: ``(L, hidden)`` Qwen2.5-VL features of the prompt's real tokens (after the crop).
        glyph: ``(G, byt5_hidden)`` ByT5 features of the glyph text's real tokens (``G`` = 0 without quotes).
    """

    tokens: torch.Tensor
    glyph: torch.Tensor


@torch.no_grad()
def mllm_features(
    text_encoder: Any, tokenizer: Any, prompt: str, max_sequence_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, mask)`` of one prompt as the reference computes them: ``(max_sequence_length, hidden)``
    hidden states after the template crop, and their int64 mask (1: a real token)."""
    chat = [[{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt or " "}]]
    inputs = tokenizer.apply_chat_template(
        chat,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding="max_length",
        max_length=max_sequence_length + TEMPLATE_CROP,
        truncation=True,
        return_tensors="pt",
    )
    ids = inputs["input_ids"].to(device)
    mask = inputs["attention_mask"].to(device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    if len(hidden) <= HIDDEN_STATE_FROM_END:
        raise ValueError(
            f"the Qwen2.5-VL text encoder has {len(hidden) - 1} layers; HunyuanVideo-1.5 reads "
            f"hidden_states[-{HIDDEN_STATE_FROM_END}]"
        )
    return hidden[-HIDDEN_STATE_FROM_END][0, TEMPLATE_CROP:], mask[0, TEMPLATE_CROP:]


@torch.no_grad()
def glyph_features(text_encoder: Any, tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """``(G, hidden)`` ByT5 features of the prompt's glyph text's real tokens (``G`` = 0 without any)."""
    text = glyph_text(prompt)
    if text is None:
        return torch.zeros((0, text_encoder.config.d_model), device=device, dtype=text_encoder.dtype)
    inputs = tokenizer(
        text, padding="max_length", max_length=GLYPH_MAX_LENGTH, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )  # fmt: skip
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device)
    # The reference hands T5 a float mask.
    features = text_encoder(input_ids=ids, attention_mask=mask.float())[0]
    return features[0][mask[0].bool()]


def encode_prompt(
    qwen: Any, qwen_tokenizer: Any, byt5: Any, byt5_tokenizer: Any, prompt: str, max_sequence_length: int,
    device: torch.device,
) -> PromptEncoding:  # fmt: skip
    """Both encodings of one prompt, real tokens only (one prompt at a time: a request's output must not
    depend on its batch, and every prompt is padded to the same length anyway)."""
    features, mask = mllm_features(qwen, qwen_tokenizer, prompt, max_sequence_length, device)
    return PromptEncoding(tokens=features[mask.bool()], glyph=glyph_features(byt5, byt5_tokenizer, prompt, device))
