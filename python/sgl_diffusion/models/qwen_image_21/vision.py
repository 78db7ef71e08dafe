"""Qwen3-VL's processor for prompts with images, without torchvision.

Qwen-Image 2.1 encodes every prompt (and its condition images) with Qwen3-VL through transformers'
``Qwen3VLProcessor``: the text is tokenized with left padding, each ``<|image_pad|>`` is repeated once per
merged 2x2 group of 16x16 patches, and ``mm_token_type_ids`` marks the image tokens for the encoder's
multimodal RoPE. That processor also owns a *video* processor, which needs torchvision, and torchvision
does not exist for every torch release on PyPI (torch 2.15 has none today). Qwen-Image 2.1 never sends
video, so :class:`Qwen3VLImageTextProcessor` is that processor with the video half left out: its call,
token expansion, chat template and batching are transformers' own, inherited unchanged. Its image half is
transformers' ``Qwen2VLImageProcessorPil`` (the PIL implementation of the ``Qwen2VLImageProcessor`` config
Qwen3-VL's ``preprocessor_config.json`` names), read from the checkpoint's ``processor/`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

__all__ = ["Qwen3VLImageTextProcessor", "load_image_text_processor"]

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for text and images only (no video processor, so no torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        del kwargs  # the parent's extra keywords configure the video half

        def token_id(token: str) -> int:
            return int(tokenizer.convert_tokens_to_ids(token))

        # What Qwen3VLProcessor.__init__ sets around ProcessorMixin.__init__, which is handed two parts only.
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or token_id(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or token_id(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or VISION_START_TOKEN
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or VISION_END_TOKEN
        self.vision_start_token_id = getattr(tokenizer, "vision_start_token_id", None) or token_id(
            self.vision_start_token
        )
        self.vision_end_token_id = getattr(tokenizer, "vision_end_token_id", None) or token_id(self.vision_end_token)


def load_image_text_processor(folder: Path) -> Qwen3VLImageTextProcessor:
    """The processor of a checkpoint's ``processor/`` folder: its tokenizer (with the chat template saved
    next to it) and image preprocessing config."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return Qwen3VLImageTextProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
        tokenizer=tokenizer,
        chat_template=_chat_template(folder) or getattr(tokenizer, "chat_template", None),
    )


def _chat_template(folder: Path) -> str | None:
    """The processor's chat template as transformers saves it (``chat_template.jinja``) or as older
    checkpoints publish it (``chat_template.json``)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        template = json.loads(legacy.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
