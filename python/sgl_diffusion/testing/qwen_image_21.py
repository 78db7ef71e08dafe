"""Qwen-Image 2.1 fixture (``QwenImage21Pipeline``).

Tiny configs with the real shape logic: the 64-channel RGBA VAE with 16x spatial compression (latents
enter the DiT unpatched: one token per 16x16 pixels, 64 channels), a Qwen3-VL text encoder (16x16 vision
patches merged 2x2, so one image slot of the encoder stands for 2x2 latent tokens, as the DiT expects), and
a processor whose chat template renders the system turn as Qwen3-VL's does (the pipeline counts the tokens
to drop from it). The tokenizer learns the prompt templates' words as single tokens, as the real 151k
vocabulary holds them.

The DiT's zero-centred text-input norm and its shared modulation start at trivial values in a fresh model:
every weight is perturbed (``seeded_component``) and the text projection scaled (:data:`TEXT_SCALE`), so a
dropped or swapped prompt moves the output far above the parity bounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models.qwen_image_21.prompt import template_texts
from .fixtures import register_fixture, seeded_component
from .tokenizers import tiny_qwen2_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import Qwen2Tokenizer

#: How the oracle is called on the fixture: 64x64 (a 4x4 grid of latent tokens), 3 steps, true CFG.
_CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 3,
    "true_cfg_scale": 4.0,
    "negative_prompt": " ",
}

#: Multiplies the text projection's output layer, so the prompt weighs in the joint attention.
TEXT_SCALE = 4.0
#: Hidden size of the tiny Qwen3-VL text model (the DiT's ``context_in_dim``).
TEXT_HIDDEN = 16

#: The scheduler: flow-match Euler with the dynamic exponential shift from the image's token count, at
#: diffusers' defaults (Qwen/Qwen-Image-2.1's own scheduler_config.json is not published yet).
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

#: Qwen3-VL's chat template, reduced to what the pipeline renders: text and image parts of system and user
#: turns, as the real template writes them (``<|im_start|>role\n...<|im_end|>\n``).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

#: The tiny processor's pixel bound for the encoder's copy of a condition image (the default output
#: resolution, 1024x1024, fits: the pipeline sizes condition images to about that area).
PROCESSOR_MAX_PIXELS = 1024 * 1024 * 2


def qwen21_tokenizer() -> Qwen2Tokenizer:
    """The fixture tokenizer: every word of the Qwen-Image 2.1 templates is one token."""
    return tiny_qwen2_tokenizer(templates=template_texts())


def qwen21_processor(tokenizer: Qwen2Tokenizer) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..models.qwen_image_21.vision import Qwen3VLImageTextProcessor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": PROCESSOR_MAX_PIXELS},
    )
    return Qwen3VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def qwen3_vl_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> torch.nn.Module:
    """A 2-layer ``Qwen3VLForConditionalGeneration`` (deepstack into its first layer) naming the tokenizer's ids."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            # Interleaved multimodal RoPE: the head's 4 frequency pairs over (time, height, width).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    return seeded_component(seed, lambda: Qwen3VLForConditionalGeneration(config))


def qwen21_vae(seed: int = 0) -> torch.nn.Module:
    """``AutoencoderKLQwenImage21``: RGBA in and out, 64 latent channels, 16x spatial compression."""
    from diffusers import AutoencoderKLQwenImage21

    return seeded_component(
        seed,
        lambda: AutoencoderKLQwenImage21(
            base_dim=8,
            decoder_base_dim=8,
            z_dim=64,
            dim_mult=[1, 1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True, True],
            # Not the defaults, so a port that ignores the config's (de)normalisation stats shows.
            latents_mean=[round(0.05 * (i % 16) - 0.4, 2) for i in range(64)],
            latents_std=[round(1.0 + 0.05 * (i % 16), 2) for i in range(64)],
        ),
    )


def qwen21_transformer(seed: int = 0) -> torch.nn.Module:
    """Two single-stream blocks, 2 heads of 16 channels, RoPE axes (frame, height, width) = (4, 6, 6)."""
    from diffusers import QwenImage21Transformer2DModel

    model = seeded_component(
        seed,
        lambda: QwenImage21Transformer2DModel(
            in_channels=64,
            out_channels=64,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            context_in_dim=TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    with torch.no_grad():
        model.txt_in.out_layer.weight.mul_(TEXT_SCALE)  # type: ignore[union-attr]
    return model


def published_processor_layout(folder: Path) -> None:
    """The published folder names transformers' ``Qwen3VLProcessor`` for its processor (the fixture builds the
    torchvision-free subclass, which diffusers records under its own name)."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen3VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_path = folder / "processor" / "processor_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["processor_class"] = "Qwen3VLProcessor"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@register_fixture(
    "qwen_image_21", pipeline_class="QwenImage21Pipeline", call_kwargs=_CALL, finish=published_processor_layout
)
def _qwen_image_21() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    tokenizer = qwen21_tokenizer()
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=qwen21_vae(0),
        text_encoder=qwen3_vl_text_encoder(tokenizer, 0),
        processor=qwen21_processor(tokenizer),
        transformer=qwen21_transformer(0),
    )
