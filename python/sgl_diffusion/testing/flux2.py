"""FLUX.2 fixtures: FLUX.2-dev (``Flux2Pipeline``) and FLUX.2-klein (``Flux2KleinPipeline``, step-distilled and
base), one builder each.

Tiny configs with the real shape logic: the 32-channel ``AutoencoderKLFlux2`` with 8x spatial compression
(latents packed in 2x2 patches: 128 transformer input channels) whose BatchNorm running statistics
(de)normalise the packed latents and are set to non-trivial values here (a fresh BatchNorm has mean 0 and
variance 1, which would hide a pipeline that skips them); text encoders deep enough for the pipelines'
hard-coded hidden-state layers (Mistral3 with 30 layers for dev's 10/20/30, Qwen3 with 27 for klein's
9/18/27), so ``joint_attention_dim`` is three times their width; tokenizers that make each word of the
system prompt and chat template one token, as the real vocabularies do, so the prompt fits in a short
``max_sequence_length``.

The DiT's text-key RMSNorm weights are scaled after the random init (:data:`TEXT_KEY_SCALE`), as the
Qwen-Image and Wan fixtures do: with random weights the image queries attend almost uniformly over the 64
text rows (most of them padding and the system prompt), and a different prompt barely moved the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .fixtures import register_fixture, seeded_component
from .tokenizers import tiny_mistral_tokenizer, tiny_qwen3_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

#: How the oracles are called on these fixtures: 64x64 (a 4x4 grid of packed tokens), 64 prompt tokens.
_DEV_CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 3,
    "guidance_scale": 4.0,
    "max_sequence_length": 64,
}
_KLEIN_CALL: dict[str, Any] = {**_DEV_CALL, "num_inference_steps": 4, "guidance_scale": 1.0}
_KLEIN_BASE_CALL: dict[str, Any] = {**_DEV_CALL, "num_inference_steps": 4, "guidance_scale": 4.0}

#: Multiplies every dual-stream block's ``attn.norm_added_k.weight`` (the spread of the logits against text
#: keys) and every single-stream block's ``attn.norm_k.weight``.
TEXT_KEY_SCALE = 8.0
#: Hidden width of the tiny text encoders; the DiT reads three of their layers side by side.
TEXT_HIDDEN = 16

#: black-forest-labs/FLUX.2-dev's (and -klein's) scheduler/scheduler_config.json; the pipelines pass their
#: own ``mu``, so the shift fields do not act.
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def flux2_system_message() -> str:
    """The system prompt FLUX.2-dev's pipeline puts before every prompt."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


def mistral3_text_encoder(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A 30-layer ``Mistral3ForConditionalGeneration`` (text model 16 wide; a one-layer Pixtral vision tower,
    which FLUX.2 never runs but the real checkpoint has)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 30,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e9},
            "sliding_window": None,
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": TEXT_HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "head_dim": 4,
        },
        image_token_index=int(tokenizer.convert_tokens_to_ids("[IMG]")),
        spatial_merge_size=1,
        vision_feature_layer=-1,
    )
    return seeded_component(seed, lambda: Mistral3ForConditionalGeneration(config))


def qwen3_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> torch.nn.Module:
    """A 27-layer ``Qwen3ForCausalLM``, 16 wide, tied embeddings (as Qwen3-4B)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded_component(seed, lambda: Qwen3ForCausalLM(config))


def flux2_vae(seed: int = 0) -> torch.nn.Module:
    """``AutoencoderKLFlux2``: 32 latent channels, 8x, with BatchNorm running stats that are not 0 / 1."""
    from diffusers import AutoencoderKLFlux2

    vae = seeded_component(
        seed,
        lambda: AutoencoderKLFlux2(
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=32,
            norm_num_groups=4,
            use_quant_conv=True,
            use_post_quant_conv=True,
        ),
    )
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        bn = vae.bn  # type: ignore[union-attr]
        bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=generator))
        bn.running_var.copy_(1.0 + torch.rand(bn.running_var.shape, generator=generator))
    return vae


def flux2_transformer(seed: int = 0, *, guidance_embeds: bool) -> torch.nn.Module:
    """Two dual- and two single-stream blocks, 2 heads of 16 channels, 4 RoPE axes of 4 channels."""
    from diffusers import Flux2Transformer2DModel

    model = seeded_component(
        seed,
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=128,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * TEXT_HIDDEN,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),
            rope_theta=2000,
            guidance_embeds=guidance_embeds,
        ),
    )
    with torch.no_grad():
        for block in model.transformer_blocks:  # type: ignore[union-attr]
            block.attn.norm_added_k.weight.mul_(TEXT_KEY_SCALE)
        for block in model.single_transformer_blocks:  # type: ignore[union-attr]
            block.attn.norm_k.weight.mul_(TEXT_KEY_SCALE)
    return model


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


@register_fixture("flux2_dev", pipeline_class="Flux2Pipeline", call_kwargs=_DEV_CALL)
def _flux2_dev() -> DiffusionPipeline:
    from diffusers import Flux2Pipeline

    tokenizer = tiny_mistral_tokenizer(templates=[flux2_system_message()])
    return Flux2Pipeline(
        scheduler=_scheduler(),
        vae=flux2_vae(0),
        text_encoder=mistral3_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=flux2_transformer(0, guidance_embeds=True),
    )


def _klein(is_distilled: bool) -> DiffusionPipeline:
    from diffusers import Flux2KleinPipeline

    tokenizer = tiny_qwen3_tokenizer(templates=["user\n", "assistant\n"])
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=flux2_vae(0),
        text_encoder=qwen3_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=flux2_transformer(0, guidance_embeds=False),
        is_distilled=is_distilled,
    )


@register_fixture("flux2_klein", pipeline_class="Flux2KleinPipeline", call_kwargs=_KLEIN_CALL)
def _flux2_klein() -> DiffusionPipeline:
    """FLUX.2-klein-4B's layout: step-distilled (4 steps, no guidance)."""
    return _klein(is_distilled=True)


@register_fixture("flux2_klein_base", pipeline_class="Flux2KleinPipeline", call_kwargs=_KLEIN_BASE_CALL)
def _flux2_klein_base() -> DiffusionPipeline:
    """FLUX.2-klein-base-4B's layout: not distilled, classifier-free guidance against the empty prompt."""
    return _klein(is_distilled=False)
