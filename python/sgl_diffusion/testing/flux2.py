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

:func:`build_flux2_tiny_autoencoder` writes a random fal/FLUX.2-Tiny-AutoEncoder folder (for ``--vae-path``).
"""

from __future__ import annotations

import json
import os
import pathlib
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


#: fal/FLUX.2-Tiny-AutoEncoder's ``config.json`` as published (keys, ``_class_name``, the ``auto_map`` to its
#: remote-code module, the block counts), but 8 channels wide instead of 64. The latent side (128 channels:
#: 32 x 2x2 patches, at 16x) is what makes it fit FLUX.2, so it stays.
TINY_AUTOENCODER_CONFIG: dict[str, Any] = {
    "_class_name": "Flux2TinyAutoEncoder",
    "_diffusers_version": "0.35.2",
    "auto_map": {"AutoModel": "flux2_tiny_autoencoder.Flux2TinyAutoEncoder"},
    "act_fn": "silu",
    "decoder_block_out_channels": [8, 8, 8, 8],
    "encoder_block_out_channels": [8, 8, 8, 8],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 128,
    "latent_magnitude": 3.0,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 0.13025,
    "upsampling_scaling_factor": 2,
}
#: The tiny autoencoder's weights file, as the published folder names it.
TINY_AUTOENCODER_WEIGHTS = "diffusion_pytorch_model.safetensors"
#: Multiplies the inner autoencoder's convolution weights: at PyTorch's default init each of its ~20 layers
#: shrinks the signal, and the decoded images barely depended on the latents (0.002 between two latents).
TINY_AUTOENCODER_GAIN = 1.8
#: Added to the decoder's last bias (its output x maps to pixels 2x - 1): the random decoder's output sat near 0,
#: so nearly every pixel was clamped at 0; centred at 0.5 the images span the range and differences show.
TINY_AUTOENCODER_OUTPUT_SHIFT = 0.5


def _tiny_autoencoder_tree(config: dict[str, Any]) -> torch.nn.Module:
    """The published module tree, built here from its description rather than from our model class, so the
    files it saves check our key names: ``tiny_vae`` (diffusers' ``AutoencoderTiny`` with a quarter of the latent
    channels), ``extra_encoder`` / ``extra_decoder`` (4x4 stride-2 convolution / transposed convolution) and
    ``residual_encoder`` / ``residual_decoder`` (conv 3x3, GroupNorm(8), SiLU, conv 3x3)."""
    from diffusers import AutoencoderTiny
    from torch import nn

    wide = config["latent_channels"]
    inner = wide // 4
    tree = nn.Module()
    tree.tiny_vae = AutoencoderTiny(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        encoder_block_out_channels=tuple(config["encoder_block_out_channels"]),
        decoder_block_out_channels=tuple(config["decoder_block_out_channels"]),
        act_fn=config["act_fn"],
        latent_channels=inner,
        upsampling_scaling_factor=config["upsampling_scaling_factor"],
        num_encoder_blocks=tuple(config["num_encoder_blocks"]),
        num_decoder_blocks=tuple(config["num_decoder_blocks"]),
    )
    tree.extra_encoder = nn.Conv2d(inner, wide, kernel_size=4, stride=2, padding=1)
    tree.extra_decoder = nn.ConvTranspose2d(wide, inner, kernel_size=4, stride=2, padding=1)
    for name, channels in (("residual_encoder", wide), ("residual_decoder", inner)):
        branch = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )
        setattr(tree, name, branch)
    return tree


def build_flux2_tiny_autoencoder(out_dir: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """A random fal/FLUX.2-Tiny-AutoEncoder in its published on-disk layout (``config.json`` +
    ``diffusion_pytorch_model.safetensors``; the real folder also holds the remote-code module its ``auto_map``
    names, which nothing here runs), for ``--vae-path`` with the FLUX.2 fixtures. Deterministic per ``seed``."""
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tree = seeded_component(seed, lambda: _tiny_autoencoder_tree(TINY_AUTOENCODER_CONFIG))
    with torch.no_grad():
        for module in tree.tiny_vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(TINY_AUTOENCODER_GAIN)
        tree.tiny_vae.decoder.layers[-1].bias.add_(TINY_AUTOENCODER_OUTPUT_SHIFT)
    state = {name: tensor.contiguous() for name, tensor in tree.state_dict().items()}
    save_file(state, str(out / TINY_AUTOENCODER_WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(TINY_AUTOENCODER_CONFIG, indent=2, sort_keys=True) + "\n")
    return out
