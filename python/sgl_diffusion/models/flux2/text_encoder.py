"""Prompt embeddings for the FLUX.2 DiT: three hidden-state layers of a causal language model, side by side.

FLUX.2-dev reads Mistral Small 3.1 (transformers' ``Mistral3ForConditionalGeneration``, text only) with its
chat template around the prompt, after a fixed system prompt; FLUX.2-klein reads Qwen3 (``Qwen3ForCausalLM``)
with its chat template and the empty reasoning block (``enable_thinking=False``). Either way the templated
prompt is padded (or cut) to exactly ``max_sequence_length`` tokens, the encoder runs with the padding mask,
and the hidden states of three fixed layers (dev: 10, 20, 30; klein: 9, 18, 27; index 0 is the embedding
output) are concatenated per token: ``(B, max_sequence_length, 3 * hidden)``. The DiT attends to every row,
padding included, as the reference does.

The encoders run as transformers' models, called as diffusers calls them, so the embeddings equal
``Flux2Pipeline.encode_prompt`` / ``Flux2KleinPipeline.encode_prompt`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "KLEIN_PROMPT",
    "MISTRAL_PROMPT",
    "PromptFormat",
    "encode_prompts",
    "load_chat_tokenizer",
]

#: Longest prompt encoding the reference pipelines use by default (and the models were trained with).
MAX_PROMPT_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How one family's text encoder reads a prompt: the chat around it and which layers it keeps."""

    #: Hidden-state indices stacked for the DiT (0 is the embedding output, i the output of layer i).
    layers: tuple[int, ...]
    #: System prompt before the user turn (FLUX.2-dev); None: the user turn alone (klein).
    system_message: str | None
    #: Chat messages carry typed content parts (``[{"type": "text", ...}]``, Mistral's processor format)
    #: rather than a plain string.
    content_parts: bool
    #: Whether the template is rendered to text first and tokenized on its own (klein), or tokenized by
    #: ``apply_chat_template`` itself (dev).
    render_then_tokenize: bool
    #: A token the reference removes from prompts (dev: Mistral's ``[IMG]``, which its processor counts and
    #: would refuse a prompt whose count truncation changed); None: the prompt is taken as it is (klein).
    strip: str | None = None

    def messages(self, prompt: str) -> list[dict[str, Any]]:
        if self.strip is not None:
            prompt = prompt.replace(self.strip, "")
        content: Any = [{"type": "text", "text": prompt}] if self.content_parts else prompt
        turns: list[dict[str, Any]] = []
        if self.system_message is not None:
            system: Any = [{"type": "text", "text": self.system_message}] if self.content_parts else self.system_message
            turns.append({"role": "system", "content": system})
        turns.append({"role": "user", "content": content})
        return turns


def _mistral_system_message() -> str:
    # The system prompt BFL trained FLUX.2-dev with; diffusers ships it as data.
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


#: FLUX.2-dev: Mistral Small 3.1, system prompt, hidden states 10 / 20 / 30.
MISTRAL_PROMPT = PromptFormat(
    layers=(10, 20, 30),
    system_message=_mistral_system_message(),
    content_parts=True,
    render_then_tokenize=False,
    strip="[IMG]",
)
#: FLUX.2-klein: Qwen3, no system prompt, hidden states 9 / 18 / 27.
KLEIN_PROMPT = PromptFormat(layers=(9, 18, 27), system_message=None, content_parts=False, render_then_tokenize=True)


def _tokenize(tokenizer: Any, prompt: str, fmt: PromptFormat, max_sequence_length: int) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask)``, each ``(1, max_sequence_length)``, as the reference builds them."""
    padding = {"padding": "max_length", "truncation": True, "max_length": max_sequence_length, "return_tensors": "pt"}
    if fmt.render_then_tokenize:
        text = tokenizer.apply_chat_template(
            fmt.messages(prompt), tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        tokens = tokenizer(text, **padding)
    else:
        tokens = tokenizer.apply_chat_template(
            [fmt.messages(prompt)], add_generation_prompt=False, tokenize=True, return_dict=True, **padding
        )
    return tokens["input_ids"], tokens["attention_mask"]


@torch.no_grad()
def encode_prompts(
    text_encoder: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    fmt: PromptFormat,
    *,
    max_sequence_length: int = MAX_PROMPT_TOKENS,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Embed ``prompts`` for the FLUX.2 DiT: ``(B, max_sequence_length, len(fmt.layers) * hidden)``.

    Each prompt is encoded on its own (a batch of one), as the reference encodes a request's prompt: in a
    larger batch the encoder's matrix products may be blocked differently and move the last bits.

    Args:
        text_encoder: transformers ``Mistral3ForConditionalGeneration`` (dev) or ``Qwen3ForCausalLM`` (klein).
        tokenizer: the checkpoint's tokenizer, with its chat template.
        prompts: one string per row (an empty prompt is allowed: klein's negative prompt).
        fmt: :data:`MISTRAL_PROMPT` or :data:`KLEIN_PROMPT`.
        max_sequence_length: every row has exactly this many tokens (the templated prompt, cut or padded).
        device: where to run the encoder (default: the encoder's device).
        dtype: dtype of the returned embeddings (default: the encoder's).
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    device = torch.device(device) if device is not None else text_encoder.device
    dtype = dtype or text_encoder.dtype
    rows = []
    for prompt in prompts:
        input_ids, attention_mask = _tokenize(tokenizer, prompt, fmt, max_sequence_length)
        output = text_encoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            output_hidden_states=True,
            # Neither changes the hidden states: no KV cache to build, no vocabulary logits for every token.
            use_cache=False,
            logits_to_keep=1,
        )
        hidden = output.hidden_states
        if max(fmt.layers) >= len(hidden):
            raise ValueError(
                f"the text encoder has {len(hidden) - 1} layers; FLUX.2 reads hidden states {list(fmt.layers)}"
            )
        # (1, layers, T, hidden) -> (1, T, layers * hidden): per token, the layers side by side.
        stacked = torch.stack([hidden[k] for k in fmt.layers], dim=1).to(dtype=dtype, device=device)
        rows.append(stacked.permute(0, 2, 1, 3).reshape(1, stacked.shape[2], -1))
    return torch.cat(rows)


def load_chat_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer with its chat template.

    FLUX.2-dev's ``tokenizer/`` folder holds a Pixtral *processor*; its text half is a byte-level
    ``tokenizer.json`` that is loaded as it is (transformers' ``PreTrainedTokenizerFast``): loading it under a
    SentencePiece-style class would rebuild its pre-tokenizer and change the ids. A processor may keep the
    chat template beside the tokenizer (``chat_template.jinja`` or the older ``chat_template.json``), where
    the tokenizer alone does not look; it is attached here.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    # Qwen tokenizers (klein) load as their own class; everything else keeps tokenizer.json verbatim.
    if str(config.get("tokenizer_class", "")).startswith("Qwen2Tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    jinja, legacy = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        tokenizer.chat_template = jinja.read_text()
    elif legacy.is_file():
        tokenizer.chat_template = json.loads(legacy.read_text())["chat_template"]
    else:
        raise FileNotFoundError(f"{folder} has no chat template, which FLUX.2 prompts are rendered with")
    return tokenizer
