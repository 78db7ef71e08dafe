"""Qwen2.5-VL's processor for prompts with images, without torchvision.

Qwen-Image-Edit encodes the user's instruction together with the reference image(s): the chat template holds
one ``<|image_pad|>`` per image, the processor turns each image into 14x14 patches (resized so both sides are
multiples of 28 within the pixel bounds of the checkpoint's ``processor/`` config) and repeats that image's
pad token once per merged 2x2 patch group, and the text encoder reads patches and tokens together.

transformers' ``Qwen2VLProcessor`` also owns a *video* processor, and building one needs torchvision, which
does not exist for every torch release on PyPI (torch 2.15 has none today). Editing never sends video, so
:class:`Qwen2VLImageTextProcessor` is that processor with the video half left out: its call, token expansion
and batching are transformers' own, inherited unchanged. Its image half is transformers'
``Qwen2VLImageProcessorPil`` (the PIL implementation of the same ``Qwen2VLImageProcessor`` config), read from
the checkpoint's ``processor/`` folder in either the legacy ``preprocessor_config.json`` layout that the
published checkpoints use or transformers 5's ``processor_config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

__all__ = ["Qwen2VLImageTextProcessor", "load_image_text_processor"]

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for text and images only (no video processor, so no torchvision).

    Called as diffusers calls its processor: ``processor(text=[...], images=[...], padding=True,
    return_tensors="pt")``.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        del kwargs  # the parent's extra keywords configure the video half
        # What Qwen2VLProcessor.__init__ sets before it hands its three parts to ProcessorMixin; the video
        # token id stays known because the tokenizer and the text encoder's config name it.
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_image_text_processor(folder: Path) -> Qwen2VLImageTextProcessor:
    """The processor of a checkpoint's ``processor/`` folder (its tokenizer and image preprocessing config)."""
    return Qwen2VLImageTextProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
    )
