"""HunyuanVideo fixture (``HunyuanVideoPipeline``, the layout of hunyuanvideo-community/HunyuanVideo).

Tiny configs with the real shape logic: ``AutoencoderKLHunyuanVideo`` with 16 latent channels, 8x spatial and 4x
temporal compression; the DiT's token refiner, dual-stream and single-stream blocks over 2x2 spatial patches with
the guidance embedding; a 3-layer ``LlamaModel`` read at ``hidden_states[-3]`` (its first layer's output) and a
``CLIPTextModel`` whose pooled output conditions the DiT; the published checkpoint's scheduler (flow-match Euler,
static shift 7).

The Llama tokenizer is byte-level BPE kept as ``tokenizer.json`` (transformers 5 would rebuild a Llama-style class
from vocab and merges and change the ids), with a post-processor that prepends ``<|begin_of_text|>`` as Llama-3's
does. Its merges are learned from the pipeline's prompt template too, so each template word is one token and the
template's hard-coded crop (95 tokens: BOS and the template up to the user turn) lands where it does with the real
128k vocabulary.

The text reaches the DiT padded to ``max_sequence_length`` with an attention mask, so a port that attends to the
padding (or drops the mask's pooling rule in the token refiner) does not match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .fixtures import register_fixture, seeded_component
from .tokenizers import tiny_byte_level_tokenizer, tiny_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedTokenizerFast

#: How the oracle pipeline is called on the fixture: 9 frames (3 latent frames) of 32x32, 3 steps, the
#: embedded guidance of the model card.
_CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 9,
    "num_inference_steps": 3,
    "guidance_scale": 6.0,
    "max_sequence_length": 16,
}

#: hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 7.0}

BOS = "<|begin_of_text|>"
#: Llama-3's special tokens the template uses, in id order after the learned vocabulary.
LLAMA_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """The fixture's Llama-3 style tokenizer (see the module docstring); pads on the right, as the pipeline's
    template crop assumes."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import processors

    tokenizer = tiny_byte_level_tokenizer(
        LLAMA_SPECIAL_TOKENS,
        templates=(DEFAULT_PROMPT_TEMPLATE["template"],),
        bos_token=BOS,
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        model_max_length=4096,
    )
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def llama_text_encoder(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A 3-layer ``LlamaModel``: the pipeline reads ``hidden_states[-3]``, the first layer's output."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded_component(seed, lambda: LlamaModel(config))


def clip_text_encoder(seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, ``CLIPTextModel``): 8 channels, whose pooled output is the DiT's ``pooled_projections``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=8,
        hidden_act="quick_gelu",
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, seeded_component(seed, lambda: CLIPTextModel(config))


#: The fixture DiT's architecture (diffusers' ``HunyuanVideoTransformer3DModel`` arguments): two blocks of each
#: kind, 2 heads of 10 channels with RoPE axes (2, 4, 4), text features of the tiny Llama (16) and CLIP (8).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 2,
    "attention_head_dim": 10,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 2,
    "patch_size": 2,
    "patch_size_t": 1,
    "guidance_embeds": True,
    "text_embed_dim": 16,
    "pooled_projection_dim": 8,
    "rope_axes_dim": (2, 4, 4),
}


def hunyuan_video_transformer(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """diffusers' ``HunyuanVideoTransformer3DModel`` with :data:`TRANSFORMER_CONFIG` (and ``overrides``)."""
    from diffusers import HunyuanVideoTransformer3DModel

    return seeded_component(seed, lambda: HunyuanVideoTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides}))


def hunyuan_video_vae(seed: int = 0) -> torch.nn.Module:
    """``AutoencoderKLHunyuanVideo``: 16 latent channels, 8x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLHunyuanVideo

    return seeded_component(
        seed,
        lambda: AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        ),
    )


@register_fixture("hunyuan_video_t2v", pipeline_class="HunyuanVideoPipeline", call_kwargs=_CALL)
def _hunyuan_video_t2v() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    tokenizer = llama_tokenizer()
    clip_tokenizer, clip = clip_text_encoder(0)
    return HunyuanVideoPipeline(
        text_encoder=llama_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=hunyuan_video_transformer(0),
        vae=hunyuan_video_vae(0),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder_2=clip,
        tokenizer_2=clip_tokenizer,
    )
