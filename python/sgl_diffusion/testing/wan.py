"""Wan fixtures (Wan2.1 T2V / I2V / FLF2V, Wan2.2 TI2V-5B, Wan2.2 A14B T2V / I2V), one builder each.

Tiny configs with the real shape logic: the z16 VAE with 8x spatial / 4x temporal compression (the
48-channel residual VAE with patch 2 and 16x spatial for TI2V-5B), UMT5 text encoder, CLIP vision
encoder for Wan2.1 I2V, and the UniPC flow scheduler real checkpoints ship.

Two weight groups are scaled after the random init so that the conditioning moves the output by a
clear margin (a parity test must not pass when a prompt or an image is dropped or swapped):

* every DiT's cross-attention key norm (:data:`CROSS_ATTENTION_KEY_SCALE`): with random weights the
  attention logits are ~N(0, 1), so the few prompt tokens were drowned by the identical zero-padding
  rows (Wan2.1 I2V pads the text to 512 rows: a different prompt moved its latents by 0.6 %, now 16 %);
* the VAE encoder's latent-mean projection (:data:`ENCODER_LATENT_SCALE`): the random encoder maps
  two different images to normalised latents only ~0.05 apart (RMS; the noise beside them has spread
  1), so the I2V image barely mattered (2 % on Wan2.2 I2V-A14B's latents, now 16 %). Only
  image-to-video encodes; decoding is unchanged.

Measured (relative L2 change of the final latents, diffusers' pipelines, the call settings below):
a different prompt moves them by 16-48 % on every Wan fixture, a different image by 14-16 %.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .fixtures import register_fixture, seeded_component
from .tokenizers import tiny_t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: How the oracle pipelines are called on these fixtures: 9 frames (3 latent frames) of 32x32.
_T2V_CALL: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 9,
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "max_sequence_length": 16,
}
#: Wan2.1 I2V splits its context as `seq - 512` image tokens: the text must be padded to 512.
_I2V_CALL: dict[str, Any] = {**_T2V_CALL, "max_sequence_length": 512}
#: A14B needs enough steps for both experts to run.
_A14B_CALL: dict[str, Any] = {**_T2V_CALL, "num_inference_steps": 4, "guidance_scale_2": 3.0}

#: Multiplies the cross-attention key RMSNorm weights (which sets the spread of the text attention
#: logits): sharper text attention, so the prompt tokens outweigh the padding.
CROSS_ATTENTION_KEY_SCALE = 8.0
#: Multiplies the VAE's quant_conv rows that produce the latent mean: images map to latents that
#: differ on the scale of the noise beside them.
ENCODER_LATENT_SCALE = 10.0


def _sharpen_cross_attention(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for block in model.blocks:  # type: ignore[union-attr]
            block.attn2.norm_k.weight.mul_(CROSS_ATTENTION_KEY_SCALE)
    return model


def _spread_encoder_latents(vae: torch.nn.Module) -> torch.nn.Module:
    quant_conv = vae.quant_conv  # type: ignore[union-attr]
    mean_rows = quant_conv.weight.shape[0] // 2  # [mean; logvar] of the latent distribution
    with torch.no_grad():
        quant_conv.weight[:mean_rows].mul_(ENCODER_LATENT_SCALE)
        quant_conv.bias[:mean_rows].mul_(ENCODER_LATENT_SCALE)
    return vae


def _umt5(vocab_size: int) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        is_encoder_decoder=False,
    )
    return seeded_component(0, lambda: UMT5EncoderModel(config))


def _vae_z16() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return _spread_encoder_latents(
        seeded_component(
            0,
            lambda: AutoencoderKLWan(
                base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            ),
        )
    )


def _vae_z48() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    vae = seeded_component(
        0,
        lambda: AutoencoderKLWan(
            base_dim=8,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            temperal_downsample=[False, True, True],
        ),
    )
    return _spread_encoder_latents(vae)


def _transformer(seed: int, in_channels: int, out_channels: int = 16, **extra: Any) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    model = seeded_component(
        seed,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
            **extra,
        ),
    )
    return _sharpen_cross_attention(model)


def _unipc(flow_shift: float) -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


@register_fixture("wan21_t2v", pipeline_class="WanPipeline", call_kwargs=_T2V_CALL)
def _wan21_t2v() -> DiffusionPipeline:
    from diffusers import WanPipeline

    tokenizer = tiny_t5_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5(len(tokenizer)),
        vae=_vae_z16(),
        scheduler=_unipc(3.0),
        transformer=_transformer(0, 16),
    )


#: CLIP tokens per image of the tiny vision encoder: (32 / 8)^2 patches and the class token.
_CLIP_TOKENS = 17


def _wan21_clip_pipeline(**transformer_extra: Any) -> DiffusionPipeline:
    """Wan2.1 with the CLIP vision encoder: image-to-video, or first-last-frame with a position embedding
    over two images' tokens."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer = tiny_t5_tokenizer()
    image_encoder = seeded_component(
        0,
        lambda: CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=8,
                projection_dim=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=8,
            )
        ),
    )
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5(len(tokenizer)),
        vae=_vae_z16(),
        scheduler=_unipc(3.0),
        image_processor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
        image_encoder=image_encoder,
        # The real I2V graph: CLIP image tokens through added key/value projections.
        transformer=_transformer(0, 36, image_dim=8, added_kv_proj_dim=24, **transformer_extra),
    )


@register_fixture("wan21_i2v", pipeline_class="WanImageToVideoPipeline", call_kwargs=_I2V_CALL)
def _wan21_i2v() -> DiffusionPipeline:
    return _wan21_clip_pipeline()


@register_fixture("wan21_flf2v", pipeline_class="WanImageToVideoPipeline", call_kwargs=_I2V_CALL)
def _wan21_flf2v() -> DiffusionPipeline:
    # Wan2.1-FLF2V-14B's layout: a learned position embedding over [first ; last] CLIP tokens (the real
    # one spans 2 x 257), which makes the checkpoint take both frames.
    return _wan21_clip_pipeline(pos_embed_seq_len=2 * _CLIP_TOKENS)


@register_fixture("wan22_ti2v_5b", pipeline_class="WanPipeline", call_kwargs=_T2V_CALL)
def _wan22_ti2v_5b() -> DiffusionPipeline:
    from diffusers import WanPipeline

    tokenizer = tiny_t5_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5(len(tokenizer)),
        vae=_vae_z48(),
        scheduler=_unipc(5.0),
        transformer=_transformer(0, 48, 48),
        expand_timesteps=True,
    )


@register_fixture("wan22_t2v_a14b", pipeline_class="WanPipeline", call_kwargs=_A14B_CALL)
def _wan22_t2v_a14b() -> DiffusionPipeline:
    from diffusers import WanPipeline

    tokenizer = tiny_t5_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5(len(tokenizer)),
        vae=_vae_z16(),
        scheduler=_unipc(12.0),
        # Two experts with different weights: high-noise `transformer`, low-noise `transformer_2`.
        transformer=_transformer(0, 16),
        transformer_2=_transformer(1, 16),
        boundary_ratio=0.875,
    )


@register_fixture("wan22_i2v_a14b", pipeline_class="WanImageToVideoPipeline", call_kwargs=_A14B_CALL)
def _wan22_i2v_a14b() -> DiffusionPipeline:
    from diffusers import WanImageToVideoPipeline

    tokenizer = tiny_t5_tokenizer()
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5(len(tokenizer)),
        vae=_vae_z16(),
        scheduler=_unipc(5.0),
        transformer=_transformer(0, 36),
        transformer_2=_transformer(1, 36),
        boundary_ratio=0.9,
    )
