"""Tiny fixtures of pipelines with no native family, for the diffusers backend's tests: Stable Diffusion 3 (images,
`callback_on_step_end`), PixArt-Sigma (images, the legacy `callback`, a `__call__` option through
`diffusers_kwargs`) and CogVideoX (videos). Configs follow diffusers' own pipeline tests, shrunk to build and run in
well under a second each on CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .fixtures import flux_vae, register_fixture, seeded_component
from .tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import T5EncoderModel, T5Tokenizer


def _t5(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    return seeded_component(
        0,
        lambda: T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=d_model,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ),
    )


@register_fixture(
    "sd3",
    pipeline_class="StableDiffusion3Pipeline",
    call_kwargs={"height": 32, "width": 32, "num_inference_steps": 3, "guidance_scale": 5.0, "max_sequence_length": 32},
)
def _sd3() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    tokenizer_3 = tiny_t5_tokenizer()

    def clip(seed: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=16,
            hidden_act="quick_gelu",
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return seeded_component(seed, lambda: CLIPTextModelWithProjection(config))

    transformer = seeded_component(
        0,
        lambda: SD3Transformer2DModel(
            sample_size=4,  # 4 latent pixels x 8 = 32x32 images by default
            patch_size=2,
            in_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_projection_dim=16,
            joint_attention_dim=32,  # T5's width (the two CLIPs' 16 + 16 are padded to it)
            pooled_projection_dim=32,  # the two CLIPs' pooled 16 + 16
            out_channels=16,
            pos_embed_max_size=16,
        ),
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=flux_vae(0),
        text_encoder=clip(0),
        tokenizer=tokenizer,
        text_encoder_2=clip(1),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5(tokenizer_3),
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )


@register_fixture(
    "pixart_sigma",
    pipeline_class="PixArtSigmaPipeline",
    # Resolution binning maps sizes onto the 256-2048 px buckets of the real checkpoints: off for a tiny one.
    call_kwargs={
        "height": 32,
        "width": 32,
        "num_inference_steps": 3,
        "guidance_scale": 4.5,
        "max_sequence_length": 32,
        "use_resolution_binning": False,
    },
)
def _pixart_sigma() -> DiffusionPipeline:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = tiny_t5_tokenizer()
    transformer = seeded_component(
        0,
        lambda: PixArtTransformer2DModel(
            sample_size=4,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
    )
    vae = seeded_component(
        0,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
        ),
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


@register_fixture(
    "cogvideox",
    pipeline_class="CogVideoXPipeline",
    call_kwargs={
        "height": 16,
        "width": 16,
        "num_frames": 9,
        "num_inference_steps": 3,
        "guidance_scale": 6.0,
        "max_sequence_length": 16,
    },
)
def _cogvideox() -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = tiny_t5_tokenizer()
    transformer = seeded_component(
        0,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=32,
            num_layers=1,
            sample_width=2,
            sample_height=2,
            sample_frames=9,  # 3 latent frames: CogVideoX 1.0 decodes an odd count to 4k+1 frames
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
        ),
    )
    vae = seeded_component(
        0,
        lambda: AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
