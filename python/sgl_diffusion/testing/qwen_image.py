"""Qwen-Image fixture (``QwenImagePipeline``; Qwen-Image-2512 has the same architecture).

Tiny configs with the real shape logic: the Wan-style z16 VAE with 8x spatial compression (latents
packed in 2x2 patches: 64 transformer input channels), a Qwen2.5-VL text encoder whose token ids come
from a tokenizer that splits the prompt template exactly where the pipeline's hard-coded crop (34
tokens) expects, and the real checkpoint's scheduler configuration (dynamic exponential shift over
256..8192 image tokens, stretched to end at sigma 0.02).

The pipeline only runs the text model of Qwen2.5-VL; the vision tower is part of the class (and of the
real checkpoint) and is kept tiny.

The DiT's text-key RMSNorm weights are scaled after the random init (:data:`TEXT_KEY_SCALE`), as the Wan
fixtures do for their cross-attention: with random weights the image queries attend almost uniformly,
and a different prompt moved the final latents by only 2 % (13 % with the scale), too little for a
parity test to notice a dropped or swapped prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models.qwen_image.prompt import template_texts
from .fixtures import register_fixture, seeded_component
from .tokenizers import tiny_qwen2_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import Qwen2Tokenizer

#: How the oracle pipeline is called on the fixture: 64x64 (a 4x4 grid of packed tokens), true CFG.
_CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 3,
    "true_cfg_scale": 4.0,
    "max_sequence_length": 64,
}

#: Multiplies every block's ``attn.norm_added_k.weight`` (the spread of the logits against text keys).
TEXT_KEY_SCALE = 8.0

#: Qwen/Qwen-Image scheduler/scheduler_config.json (also Qwen-Image-2512's and the Edit models').
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def qwen_image_tokenizer() -> Qwen2Tokenizer:
    """The fixture tokenizer: every word of the Qwen-Image (and Edit) templates is one token."""
    return tiny_qwen2_tokenizer(templates=template_texts())


def qwen25_vl_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> torch.nn.Module:
    """A 2-layer ``Qwen2_5_VLForConditionalGeneration`` whose config names the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            # Multimodal RoPE: the head's 4 frequency pairs split over (time, height, width).
            "rope_parameters": {"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    return seeded_component(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))


def qwen_image_vae(seed: int = 0) -> torch.nn.Module:
    """``AutoencoderKLQwenImage`` with 16 latent channels and 8x spatial compression, non-trivial latent stats."""
    from diffusers import AutoencoderKLQwenImage

    return seeded_component(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            # Not the defaults, so a port that ignores the config's (de)normalisation stats shows.
            latents_mean=[round(0.1 * i - 0.8, 2) for i in range(16)],
            latents_std=[round(1.0 + 0.1 * i, 2) for i in range(16)],
        ),
    )


def qwen_image_transformer(seed: int = 0, *, zero_cond_t: bool = False) -> torch.nn.Module:
    """Two double-stream blocks, 2 heads of 16 channels, RoPE axes (frame, height, width) = (8, 4, 4).

    ``zero_cond_t=True`` is Qwen-Image-Edit-2511's variant.
    """
    from diffusers import QwenImageTransformer2DModel

    model = seeded_component(
        seed,
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
            zero_cond_t=zero_cond_t,
        ),
    )
    with torch.no_grad():
        for block in model.transformer_blocks:  # type: ignore[union-attr]
            block.attn.norm_added_k.weight.mul_(TEXT_KEY_SCALE)
    return model


@register_fixture("qwen_image", pipeline_class="QwenImagePipeline", call_kwargs=_CALL)
def _qwen_image() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tokenizer = qwen_image_tokenizer()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=qwen_image_vae(0),
        text_encoder=qwen25_vl_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=qwen_image_transformer(0),
    )


#: How the edit oracles are called on their fixtures (the input images are the test's): 3 steps, true CFG.
_EDIT_CALL: dict[str, Any] = {"num_inference_steps": 3, "true_cfg_scale": 4.0}

#: The tiny processor's pixel bound for the text encoder's copy of an image (the published checkpoints allow
#: 12845056): at most 256 merged 28x28 patches, so Qwen-Image-Edit's 1024x1024 condition image stays cheap.
PROCESSOR_MAX_PIXELS = 256 * 28 * 28


def qwen_image_processor(tokenizer: Qwen2Tokenizer) -> Any:
    """The checkpoint's ``processor``: Qwen2-VL image preprocessing with the fixture tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..models.qwen_image.vision import Qwen2VLImageTextProcessor

    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": PROCESSOR_MAX_PIXELS})
    return Qwen2VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


def published_processor_layout(folder: Path) -> None:
    """The published Qwen-Image-Edit folders name transformers' ``Qwen2VLProcessor`` for their processor
    (the fixture builds the torchvision-free subclass, which diffusers records under its own name)."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_path = folder / "processor" / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _edit_pipeline(pipeline_class: str, *, zero_cond_t: bool = False) -> DiffusionPipeline:
    import diffusers

    tokenizer = qwen_image_tokenizer()
    return getattr(diffusers, pipeline_class)(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=qwen_image_vae(0),
        text_encoder=qwen25_vl_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        processor=qwen_image_processor(tokenizer),
        transformer=qwen_image_transformer(0, zero_cond_t=zero_cond_t),
    )


@register_fixture(
    "qwen_image_edit", pipeline_class="QwenImageEditPipeline", call_kwargs=_EDIT_CALL, finish=published_processor_layout
)
def _qwen_image_edit() -> DiffusionPipeline:
    return _edit_pipeline("QwenImageEditPipeline")


@register_fixture(
    "qwen_image_edit_plus",
    pipeline_class="QwenImageEditPlusPipeline",
    call_kwargs=_EDIT_CALL,
    finish=published_processor_layout,
)
def _qwen_image_edit_plus() -> DiffusionPipeline:
    """Qwen-Image-Edit-2509's layout."""
    return _edit_pipeline("QwenImageEditPlusPipeline")


@register_fixture(
    "qwen_image_edit_2511",
    pipeline_class="QwenImageEditPlusPipeline",
    call_kwargs=_EDIT_CALL,
    finish=published_processor_layout,
)
def _qwen_image_edit_2511() -> DiffusionPipeline:
    """Qwen-Image-Edit-2511: Edit-Plus with ``zero_cond_t`` (reference tokens modulated at timestep 0)."""
    return _edit_pipeline("QwenImageEditPlusPipeline", zero_cond_t=True)
