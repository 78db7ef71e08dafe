"""Z-Image fixture (``ZImagePipeline``, the layout of Tongyi-MAI/Z-Image-Turbo).

Tiny configs with the real shape logic: the FLUX-style ``AutoencoderKL`` (16 latent channels, 8x, scaling and
shift factors), a 2x2-patchified single-stream DiT whose image and caption sequences are padded to multiples of
32 with learned pad tokens, a Qwen3 text encoder read at its second-to-last hidden states, and the published
checkpoint's scheduler (flow-match Euler, static shift 3).

``x_pad_token`` / ``cap_pad_token`` are parameters the real checkpoint trains but diffusers creates without a
meaningful value (zeros in 0.42.1, ``torch.empty`` before); they are filled with unit-variance noise here, so a
port that pads with anything else (zeros, the repeated last token) shows. At the fixture's 64x64 call the image
has 16 tokens, so half the image sequence is pad tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .fixtures import flux_vae, register_fixture, seeded_component
from .tokenizers import tiny_qwen3_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import Qwen2Tokenizer

#: How the oracle pipeline is called on the fixture: 64x64 (a 4x4 grid of 2x2 patches), no CFG as Turbo runs.
_CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "guidance_scale": 0.0,
    "max_sequence_length": 64,
}

#: Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

#: The chat turn the pipeline wraps every prompt in (``enable_thinking=True``: no reasoning block), so that
#: each of its words is one token of the tiny vocabulary, as in the real one.
CHAT_TEXT = ("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n",)

#: Seed of the pad tokens' noise (independent of the weights' seed).
PAD_TOKEN_SEED = 2


def z_image_tokenizer() -> Qwen2Tokenizer:
    """The fixture's Qwen3 tokenizer, with a chat template that honours ``enable_thinking``."""
    return tiny_qwen3_tokenizer(templates=CHAT_TEXT)


def qwen3_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> torch.nn.Module:
    """A 3-layer ``Qwen3Model``: the pipeline reads ``hidden_states[-2]``, the second layer's output."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        rope_theta=1e6,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded_component(seed, lambda: Qwen3Model(config))


def z_image_transformer(seed: int = 0, *, cap_feat_dim: int = 16) -> torch.nn.Module:
    """Two main blocks and one refiner block per stream, 2 heads of 16 channels, RoPE axes (8, 4, 4)."""
    from diffusers import ZImageTransformer2DModel

    model = seeded_component(
        seed,
        lambda: ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=cap_feat_dim,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[256, 32, 32],
        ),
    )
    generator = torch.Generator().manual_seed(PAD_TOKEN_SEED)
    with torch.no_grad():
        for pad in (model.x_pad_token, model.cap_pad_token):
            pad.copy_(torch.randn(pad.shape, generator=generator))
    return model


@register_fixture("z_image_turbo", pipeline_class="ZImagePipeline", call_kwargs=_CALL)
def _z_image_turbo() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = z_image_tokenizer()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=flux_vae(0),
        text_encoder=qwen3_text_encoder(tokenizer, 0),
        tokenizer=tokenizer,
        transformer=z_image_transformer(0),
    )
