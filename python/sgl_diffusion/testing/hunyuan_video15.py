"""HunyuanVideo-1.5 fixture (``HunyuanVideo15Pipeline``, the layout of hunyuanvideo-community/HunyuanVideo-1.5-*).

Tiny configs with the real shape logic: ``AutoencoderKLHunyuanVideo15`` with 8 latent channels, 16x spatial and
4x temporal compression (five stages, as the published one); the DiT's token refiner, ByT5 glyph projection,
image projection and dual-stream blocks over 1x1x1 patches, its input the noisy latents, the condition latents
and the condition mask stacked on channels (17 = 8 + 8 + 1); a 3-layer ``Qwen2_5_VLTextModel`` read at
``hidden_states[-3]`` (the pipeline skips the last two layers) and a ``T5EncoderModel`` under the byte-level
``ByT5Tokenizer`` for the glyph text (the quoted parts of a prompt); the guider (classifier-free guidance 6) and
flow-match Euler with a static shift.

The Qwen2 tokenizer learns its merges from the pipeline's system message too, so each of its words is one token
as with the real vocabulary; the pipeline's hard-coded crop (108 tokens) then cuts within the chat template's
prefix as it does there, and the user's prompt survives it whole. The chat template renders the real one's turns.

The reference pads prompts to 1000 tokens and glyph text to 256 with masks, and passes 729 all-zero, masked
image tokens for text-to-video, so a port that attends to any padding does not match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .fixtures import register_fixture, seeded_component
from .tokenizers import QWEN3_CHAT_TEMPLATE, tiny_qwen2_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import Qwen2Tokenizer

#: How the oracle pipeline is called on the fixture: 9 frames (3 latent frames) of 32x32, 3 steps.
_CALL: dict[str, Any] = {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 3}
#: Image-to-video takes its size from the input image (the bucket of the transformer's target_size nearest the
#: image's aspect), so the call names none.
_I2V_CALL: dict[str, Any] = {"num_frames": 9, "num_inference_steps": 3}

#: The guider's CFG scale and the scheduler's shift (the 480p checkpoints' values as the reference pipeline's
#: documentation runs them).
GUIDANCE_SCALE = 6.0
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 5.0}

#: Qwen2.5-VL renders system/user/assistant turns as Qwen3's template does when thinking is not asked for.
QWEN25_CHAT_TEMPLATE = QWEN3_CHAT_TEMPLATE


def system_message() -> str:
    """The reference pipeline's system message (its words become tokens of the fixture vocabulary)."""
    # The default of its prompt-encoding helper: the message __init__ stores as well.
    import inspect

    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def qwen_tokenizer() -> Qwen2Tokenizer:
    tokenizer = tiny_qwen2_tokenizer(templates=(system_message(),))
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def qwen_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> torch.nn.Module:
    """A 3-layer ``Qwen2_5_VLTextModel``: the pipeline reads ``hidden_states[-3]``, the first layer's output."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Multimodal RoPE: the head's 4 frequency pairs split over (time, height, width).
        rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
        bos_token_id=None,  # the chat template starts with no BOS
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded_component(seed, lambda: Qwen2_5_VLTextModel(config))


def byt5_text_encoder(seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """(``ByT5Tokenizer``, 2-layer ``T5EncoderModel`` of 8 channels) for the glyph text."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, seeded_component(seed, lambda: T5EncoderModel(config))


#: The fixture DiT's architecture (diffusers' ``HunyuanVideo15Transformer3DModel`` arguments): two dual-stream
#: blocks, 2 heads of 10 channels with RoPE axes (2, 4, 4), text features of the tiny Qwen (16) and ByT5 (8).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "in_channels": 17,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 10,
    "num_layers": 2,
    "num_refiner_layers": 2,
    "patch_size": 1,
    "patch_size_t": 1,
    "text_embed_dim": 16,
    "text_embed_2_dim": 8,
    "image_embed_dim": 12,
    "rope_axes_dim": (2, 4, 4),
    "target_size": 64,
    "task_type": "t2v",
}


def hunyuan_video15_transformer(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """diffusers' ``HunyuanVideo15Transformer3DModel`` with :data:`TRANSFORMER_CONFIG` (and ``overrides``)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return seeded_component(seed, lambda: HunyuanVideo15Transformer3DModel(**{**TRANSFORMER_CONFIG, **overrides}))


def hunyuan_video15_vae(seed: int = 0) -> torch.nn.Module:
    """``AutoencoderKLHunyuanVideo15``: 8 latent channels, 16x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLHunyuanVideo15

    return seeded_component(
        seed,
        lambda: AutoencoderKLHunyuanVideo15(
            in_channels=3,
            out_channels=3,
            latent_channels=8,
            block_out_channels=(8, 8, 16, 16, 16),
            layers_per_block=1,
            spatial_compression_ratio=16,
            temporal_compression_ratio=4,
            scaling_factor=1.03682,
        ),
    )


@register_fixture("hunyuan_video15_t2v", pipeline_class="HunyuanVideo15Pipeline", call_kwargs=_CALL)
def _hunyuan_video15_t2v() -> DiffusionPipeline:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    tokenizer = qwen_tokenizer()
    byt5_tokenizer, byt5 = byt5_text_encoder(0)
    return HunyuanVideo15Pipeline(
        text_encoder=qwen_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=hunyuan_video15_transformer(0),
        vae=hunyuan_video15_vae(0),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder_2=byt5,
        tokenizer_2=byt5_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE_SCALE),
    )


def siglip_image_encoder(seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """(``SiglipImageProcessor`` resizing to 32x32, 2-layer ``SiglipVisionModel``): 16 image tokens of 12 channels,
    the DiT's ``image_embed_dim`` (the published one: 729 tokens of 1152 at 384x384)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    config = SiglipVisionConfig(
        hidden_size=TRANSFORMER_CONFIG["image_embed_dim"],
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return processor, seeded_component(seed, lambda: SiglipVisionModel(config))


@register_fixture("hunyuan_video15_i2v", pipeline_class="HunyuanVideo15ImageToVideoPipeline", call_kwargs=_I2V_CALL)
def _hunyuan_video15_i2v() -> DiffusionPipeline:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline

    tokenizer = qwen_tokenizer()
    byt5_tokenizer, byt5 = byt5_text_encoder(0)
    processor, siglip = siglip_image_encoder(0)
    return HunyuanVideo15ImageToVideoPipeline(
        text_encoder=qwen_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=hunyuan_video15_transformer(1, task_type="i2v"),
        vae=hunyuan_video15_vae(0),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder_2=byt5,
        tokenizer_2=byt5_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE_SCALE),
        image_encoder=siglip,
        feature_extractor=processor,
    )
