"""The chat templates Qwen-Image 2.1 wraps every prompt in (diffusers' ``QwenImage21Pipeline``).

The prompt is a raw template string handed to the processor (not ``apply_chat_template``: the two tokenize
differently and the checkpoint expects this one). The encoder reads the whole template; the hidden states
of the system turn are dropped, counted as the tokens the processor's chat template gives the system message
alone (so the count follows the checkpoint's tokenizer and template, as the reference derives it).
"""

from __future__ import annotations

__all__ = [
    "IMAGE_PLACEHOLDER",
    "SYSTEM_PROMPT",
    "T2I_TEMPLATE",
    "TI2I_TEMPLATE",
    "template_texts",
    "ti2i_template",
]

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."

#: Text-to-image: ``{}`` is the user prompt.
T2I_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
)
#: Condition image ``i`` (counted from 1) in the user turn.
IMAGE_PLACEHOLDER = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
#: With condition images: their placeholders, then ``{}`` the user prompt.
TI2I_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{IMAGE_PLACEHOLDER.format(1)}{{}}"
    "<|im_end|>\n<|im_start|>assistant\n"
)


def ti2i_template(num_images: int) -> str:
    """The template for ``num_images`` condition images (placeholders separated by a space, as diffusers')."""
    placeholders = " ".join(IMAGE_PLACEHOLDER.format(i) for i in range(1, num_images + 1))
    return TI2I_TEMPLATE.replace(IMAGE_PLACEHOLDER.format(1), placeholders)


def template_texts() -> tuple[str, ...]:
    """The templates' fixed text (prompt slot empty), for tokenizers that must split it as Qwen3-VL's does."""
    return (T2I_TEMPLATE.format(""), ti2i_template(2).format(""))
