"""GLM-Image fixture (``GlmImagePipeline``: an autoregressive prior, then a DiT decodes).

Tiny configs with the real shape logic:

* the prior (``vision_language_encoder``, transformers' ``GlmImageForConditionalGeneration``) samples image
  tokens of a codebook of :data:`CODEBOOK` entries on the 32-pixel grid, first a small preview grid, then the
  target grid; the pipeline upsamples the target grid's tokens 2x to the DiT's 16-pixel token grid;
* the DiT (``GlmImageTransformer2DModel``) has patch 2 over the 8x VAE, so one DiT token is 16 pixels as in
  the real model (the fixture notes' rule: patch size x VAE factor = 16);
* the glyph encoder is a ByT5 ``T5EncoderModel`` over ``ByT5Tokenizer``'s byte vocabulary;
* the processor is transformers' ``GlmImageProcessor`` over a tiny byte-level BPE tokenizer whose special
  tokens play the real ones' parts (image start = the tokenizer's bos, appended after the ``<sop>h w<eop>``
  grid strings; image end = the prior's eos; ``<|image|>`` placeholders of input images).

Random logits are nearly flat, so seeded sampling would give every prompt the same prior tokens: the prior's
``lm_head`` is scaled by :data:`LM_HEAD_SCALE`. Its ``generation_config`` samples with temperature, top-k and
top-p (:data:`GENERATION_CONFIG`), so the sampling warpers take part in every parity test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .fixtures import register_fixture, seeded_component
from .tokenizers import tiny_byte_level_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedTokenizerFast

#: How the oracle pipeline is called on the fixture: 64x64 (a 2x2 prior grid, upsampled to the DiT's 4x4
#: tokens), 3 steps, classifier-free guidance.
_CALL: dict[str, Any] = {"height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 1.5}

#: Entries of the prior's image codebook: its sampled vocabulary and the DiT's prior-token embedding.
CODEBOOK = 128
#: Multiplies the prior's ``lm_head`` after the random init (see the module docstring).
LM_HEAD_SCALE = 30.0
#: The prior's sampling settings (the published checkpoint samples too; these exercise every warper).
GENERATION_CONFIG: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95}

IMAGE_START = "<|begin_of_image|>"
IMAGE_END = "<|end_of_image|>"
IMAGE_TOKEN = "<|image|>"
PAD = "<|endoftext|>"
#: The tokenizer's special tokens, in id order after the learned byte-level vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    "[gMASK]",
    "<sop>",
    "<eop>",
    "<|user|>",
    "<|assistant|>",
    IMAGE_START,
    IMAGE_END,
    IMAGE_TOKEN,
)
#: The processor's chat template: one user turn of images (each bracketed by image start/end, as the prior's
#: position ids expect) and text, then the assistant's turn, which the processor follows with the grids.
CHAT_TEMPLATE = (
    "[gMASK]{% for message in messages %}<|user|>\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_START + IMAGE_TOKEN + IMAGE_END + "{% endif %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}<|assistant|>\n"
)

#: A FlowMatchEulerDiscreteScheduler with GLM-Image's dynamic shift (CogView4's schedule family).
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "time_shift_type": "linear",
    "use_dynamic_shifting": True,
}


def glm_image_tokenizer() -> PreTrainedTokenizerFast:
    """The prior's tokenizer: byte-level BPE, then :data:`SPECIAL_TOKENS`."""
    return tiny_byte_level_tokenizer(
        SPECIAL_TOKENS,
        bos_token=IMAGE_START,
        eos_token=IMAGE_END,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )


def glm_image_processor(tokenizer: PreTrainedTokenizerFast) -> Any:
    """``GlmImageProcessor``: the torchvision-free image processor with the fixture tokenizer and chat template.
    Patch 16 (merge 1) as the real one: the processor halves an input image before patching, so one token of
    its grid covers 32 pixels of the image, and that grid upsampled 2x lands on the DiT's 16-pixel tokens."""
    from transformers import GlmImageProcessor
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    image_processor = GlmImageImageProcessorPil(
        patch_size=16,
        temporal_patch_size=1,
        merge_size=1,
        min_pixels=32 * 32,
        max_pixels=256 * 256,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def glm_image_prior(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A 2-layer ``GlmImageForConditionalGeneration`` whose config names the tokenizer's ids."""
    from transformers import GenerationConfig, GlmImageConfig, GlmImageForConditionalGeneration

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    config = GlmImageConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "vision_vocab_size": CODEBOOK,
            # Multimodal RoPE: the head's 8 frequency pairs split over (time, height, width).
            "rope_parameters": {"mrope_section": [4, 2, 2], "rope_type": "default", "rope_theta": 10000.0},
            "pad_token_id": token_id(PAD),
            "eos_token_id": token_id(IMAGE_END),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "image_size": 256,
            "patch_size": 16,
            "intermediate_size": 32,
        },
        vq_config={"embed_dim": 32, "num_embeddings": CODEBOOK, "latent_channels": 32},
        image_token_id=token_id(IMAGE_TOKEN),
        image_start_token_id=token_id(IMAGE_START),
        image_end_token_id=token_id(IMAGE_END),
    )
    model = seeded_component(seed, lambda: GlmImageForConditionalGeneration(config))
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)  # type: ignore[union-attr]
    model.generation_config = GenerationConfig(
        **GENERATION_CONFIG,
        bos_token_id=token_id(IMAGE_START),
        eos_token_id=token_id(IMAGE_END),
        pad_token_id=token_id(PAD),
    )
    return model


def glyph_encoder(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """The ByT5 glyph encoder: a 2-layer ``T5EncoderModel`` (gated GELU, as ByT5)."""
    from transformers import T5Config, T5EncoderModel

    return seeded_component(
        seed,
        lambda: T5EncoderModel(
            T5Config(
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
                decoder_start_token_id=0,
            )
        ),
    )


def glm_image_transformer(seed: int = 0) -> torch.nn.Module:
    """Two blocks, 2 heads of 8 channels, a 32-wide glyph input and the prior codebook's embedding."""
    from diffusers import GlmImageTransformer2DModel

    return seeded_component(
        seed,
        lambda: GlmImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            text_embed_dim=32,
            time_embed_dim=16,
            condition_dim=8,
            prior_vq_quantizer_codebook_size=CODEBOOK,
        ),
    )


def glm_image_vae(seed: int = 0) -> torch.nn.Module:
    """``AutoencoderKL`` with 16 latent channels, 8x downsampling and per-channel latent statistics."""
    from diffusers import AutoencoderKL

    return seeded_component(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            # Not the defaults, so a port that ignores the config's (de)normalisation stats shows.
            latents_mean=[round(0.05 * i, 2) for i in range(16)],
            latents_std=[round(1.0 + 0.05 * i, 2) for i in range(16)],
        ),
    )


@register_fixture("glm_image", pipeline_class="GlmImagePipeline", call_kwargs=_CALL)
def _glm_image() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline
    from transformers import ByT5Tokenizer

    tokenizer = glm_image_tokenizer()
    glyph_tokenizer = ByT5Tokenizer()
    return GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=glm_image_processor(tokenizer),
        text_encoder=glyph_encoder(len(glyph_tokenizer), 0),
        vision_language_encoder=glm_image_prior(tokenizer, 0),
        vae=glm_image_vae(0),
        transformer=glm_image_transformer(0),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def patch_reference_image_tokens(pipe: DiffusionPipeline) -> None:
    """Lets diffusers' ``GlmImagePipeline`` (0.42.1) tokenize input images under transformers 5, in place.

    Its image-to-image path concatenates the prior's per-image feature maps (``get_image_features(...)
    .pooler_output``, a list of ``(hidden, rows, columns)`` maps in transformers 5) along their first axis and
    hands the result to ``get_image_tokens``, which wants the list: the codebook's convolution then sees one
    channel and raises. The two methods are wrapped so that the pipeline's own call passes each image's
    features packed as ``(rows * columns, hidden)`` (what its concatenation expects) and ``get_image_tokens``
    unpacks them by the grids it is given, back to transformers' maps. The tokens are then those the prior's
    own forward puts in place of the images (``generate``'s calls, by keyword, are left alone)."""
    prior = pipe.vision_language_encoder
    features, tokens = prior.get_image_features, prior.get_image_tokens

    def packed_features(*args: Any, **kwargs: Any) -> Any:
        output = features(*args, **kwargs)
        if args:  # the pipeline's positional call, not generate's
            output.pooler_output = [each.flatten(1).T for each in output.pooler_output]
        return output

    def unpacked_tokens(hidden_states: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        sizes = image_grid_thw.prod(dim=-1).tolist()
        maps = [
            packed.T.reshape(-1, int(grid[1]), int(grid[2]))
            for packed, grid in zip(torch.split(hidden_states, sizes), image_grid_thw, strict=True)
        ]
        return tokens(maps)

    prior.get_image_features, prior.get_image_tokens = packed_features, unpacked_tokens
