"""The chat templates Qwen-Image wraps every prompt in, and how many of their tokens are cropped away.

The DiT was trained on Qwen2.5-VL hidden states of the *prompt part* only: the text encoder reads the
whole template (so the prompt is encoded in the context of the system instruction), then the hidden
states of the template's fixed prefix are dropped. The prefix lengths are counted in tokens of the real
Qwen2.5-VL tokenizer; they are facts of the checkpoints, not something derived from the template text at
run time (a different tokenizer would give a different count, and the model would see other tokens).
"""

from __future__ import annotations

__all__ = [
    "EDIT_PLUS_PROMPT_TEMPLATE",
    "EDIT_PROMPT_TEMPLATE",
    "EDIT_TEMPLATE_PREFIX_TOKENS",
    "MAX_PROMPT_TOKENS",
    "PICTURE_TEMPLATE",
    "PROMPT_TEMPLATE",
    "TEMPLATE_PREFIX_TOKENS",
    "template_texts",
]

#: Text-to-image (Qwen-Image, Qwen-Image-2512): ``{}`` is the user prompt.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: Tokens of PROMPT_TEMPLATE before ``{}``: system turn, then ``<|im_start|>user\n``.
TEMPLATE_PREFIX_TOKENS = 34

#: Image editing (Qwen-Image-Edit): the reference image's vision tokens sit right before the instruction.
EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: Tokens of EDIT_PROMPT_TEMPLATE before ``<|vision_start|>`` (and of EDIT_PLUS_PROMPT_TEMPLATE before ``{}``).
EDIT_TEMPLATE_PREFIX_TOKENS = 64

#: Image editing with several reference images (Qwen-Image-Edit-2509/2511, "Edit Plus"): the same system turn;
#: ``{}`` is one PICTURE_TEMPLATE per reference image, then the user instruction.
EDIT_PLUS_PROMPT_TEMPLATE = EDIT_PROMPT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
#: Reference image ``{}`` (counted from 1) in an Edit-Plus prompt.
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

#: Prompt tokens read after the template prefix (the tokenizer truncates at this + the prefix).
MAX_PROMPT_TOKENS = 1024


def template_texts() -> tuple[str, ...]:
    """The templates' fixed text (prompt slot empty), for tokenizers that must split it as Qwen2.5-VL's does."""
    return (PROMPT_TEMPLATE.format(""), EDIT_PROMPT_TEMPLATE.format(""))
