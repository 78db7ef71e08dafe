"""Qwen-Image 2.1's prompt encoding: Qwen3-VL (from transformers) over the templated prompt and its
condition images, called exactly as diffusers' ``QwenImage21Pipeline._get_qwen_prompt_embeds`` calls it.

* The prompt goes into ``prompt.T2I_TEMPLATE`` (or the condition-image template) as a raw string; an empty
  prompt becomes " " (Qwen has no bos token, so the encoder would read nothing).
* The processor tokenizes with left padding; its ``mm_token_type_ids`` and the images' patches go to the
  encoder.
* The hidden state read is the *last decoder layer's output before the final RMSNorm* (what the DiT was
  trained on). From transformers 5 ``hidden_states[-1]`` is tied to the normalised ``last_hidden_state``, so,
  as the reference does, a forward hook on the final norm returns its input for this call.
* Each row keeps its real tokens only, less the system turn (``drop`` tokens, counted from the processor's
  chat template as the reference counts them), with a mask of the positions holding image slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .prompt import SYSTEM_PROMPT, T2I_TEMPLATE, ti2i_template

__all__ = ["EncodedPrompt", "Qwen21PromptEncoder"]


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's encoder rows: ``embeds`` ``(L, hidden)`` and ``image_slots`` ``(L,)`` bool."""

    embeds: torch.Tensor
    image_slots: torch.Tensor


def condition_copy(image: Image.Image) -> Image.Image:
    """The encoder's copy of a condition image: RGBA composited over white (the checkpoint was trained so);
    the VAE still reads all four channels."""
    if image.mode != "RGBA":
        return image
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


class Qwen21PromptEncoder:
    """Qwen3-VL text encoding of Qwen-Image 2.1 prompts (see the module docstring)."""

    def __init__(self, text_encoder: torch.nn.Module, processor: Any) -> None:
        self.text_encoder = text_encoder
        self.processor = processor
        system = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
        self.drop = len(processor.apply_chat_template(system, tokenize=True, return_dict=False)[0])
        self.image_token_id = int(processor.tokenizer.encode("<|image_pad|>")[0])

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.text_config.hidden_size)

    def token_count(self, prompt: str, images: int = 0) -> int:
        """Tokens of the templated prompt without image slots (what a prompt-length bound can check)."""
        template = T2I_TEMPLATE if images == 0 else ti2i_template(images)
        return len(self.processor.tokenizer(template.format(prompt or " ")).input_ids)

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image] | None,
        device: torch.device,
    ) -> list[EncodedPrompt]:
        """The prompts encoded together (as one reference call), each with the same condition images."""
        prompts = [prompt or " " for prompt in prompts]
        kwargs: dict[str, Any] = {"padding": True, "padding_side": "left", "return_tensors": "pt"}
        if images is None:
            texts = [T2I_TEMPLATE.format(prompt) for prompt in prompts]
        else:
            template = ti2i_template(len(images))
            texts = [template.format(prompt) for prompt in prompts]
            # One set of images per prompt, in the order its placeholders appear.
            kwargs["images"] = [condition_copy(image) for _ in prompts for image in images]
        inputs = self.processor(text=texts, **kwargs).to(device)
        forward: dict[str, Any] = {
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "output_hidden_states": True,
        }
        if images is not None and "pixel_values" in inputs:
            forward.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
        if "mm_token_type_ids" in inputs:
            forward["mm_token_type_ids"] = inputs.mm_token_type_ids

        model = self.text_encoder.model
        text_model = getattr(model, "language_model", model)
        handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            hidden = self.text_encoder(**forward).hidden_states[-1]
        finally:
            handle.remove()

        encoded = []
        for row, ids, mask in zip(hidden, inputs.input_ids, inputs.attention_mask, strict=True):
            keep = mask.bool()
            encoded.append(
                EncodedPrompt(
                    embeds=row[keep][self.drop :],
                    image_slots=(ids[keep] == self.image_token_id)[self.drop :],
                )
            )
        return encoded
