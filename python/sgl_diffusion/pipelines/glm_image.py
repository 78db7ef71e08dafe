"""GLM-Image (zai-org/GLM-Image), text-to-image and image editing: its family adapter and pipeline.

Matches diffusers' `GlmImagePipeline` on the same weights and seed:

* the autoregressive prior (`models/glm_image/prior.py`) samples each request's image tokens from its seed
  as diffusers does for the request alone (requests whose prompts have one token length share a
  `generate`); a request may bring them instead (`prior_token_ids`, diffusers' argument of that name). A
  request's outputs share its prior tokens, as diffusers repeats them per image of a prompt;
* the glyph encoder (ByT5) reads the prompt's quoted text ('...', "...", “...”, 「...」), every quote its own
  sequence, and keeps only their real tokens (the text stream's length varies by prompt: rows of one length
  run together, `text_lengths.py`);
* classifier-free guidance (on when `guidance_scale > 1`, 1.5 by default) runs the unconditional branch
  with the glyph encoding of "" and the prior tokens dropped. GLM-Image has no negative prompt: a request
  that brings one is refused;
* noise drawn per request from a CPU generator in the latent layout (B, 16, H/8, W/8), flow-match Euler on
  GLM-Image's schedule (integer timesteps 1000 -> 1 as the model's time, sigmas shifted by
  `mu = sqrt(tokens / 256) * max_shift + base_shift`), and the VAE's per-channel latent statistics.

Image editing (`generate(image=...)`, `--image-path`, `POST /v1/images/edits`; diffusers' `image=`): a request's
input images (up to `MAX_INPUT_IMAGES`) come before its prompt in the prior's prompt; the prior's vision
encoder and codebook give each its image tokens (`encode_prior_images`), and the prior samples only the
target grid. For the DiT each image is VAE-encoded (the distribution's mode, normalised) and run once at
timestep 0 with its own prior tokens; every block's keys and values of those tokens (diffusers' KV cache) are
put in front of the generated image's in the conditional branch only (`ModelInputs.cond_only`): the
unconditional branch sees neither the images nor the prior tokens, so the two branches always run as two
forwards. The image is VAE-encoded at the size of its prior grid (16 pixels per upsampled prior token): the
reference encodes it at its own size floored to 16 pixels, the same size wherever the reference runs (it
fails where the two grids disagree: sides whose remainder modulo 32 is 16 or more, or images the processor
rescales into its pixel bounds). A request with images and no size gets the first image's size, floored to 32
pixels (`FirstInputWithinArea`, applied by the Rust core): the reference's
`height or image_height` (its own code samples the prior before it gets there and fails without a size; the
model card says to give one). Requests batch only with requests that bring the very same image files
(`image_paths` is an extra batch-key field): the images' keys and values are computed once per batch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, GlmImageForConditionalGeneration, T5EncoderModel

from ..errors import invalid_request
from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.glm_image import GlmImageTransformer2DModel
from ..models.glm_image.prior import PRIOR_TOKEN_PIXELS, PriorImages, encode_prior_images, sample_prior_tokens
from ..models.glm_image.transformer import LayerKV
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState, per_row
from .conditioning import ModelInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import Denoiser
from .images import load_image
from .latents import denormalize_latents, draw_noise, normalize_latents
from .spec import FirstInputWithinArea, PipelineSpec, SamplingDefaults, image_limits, tokenizer_limit
from .text_lengths import TEXT_LENGTHS, ByTextLength, each_text_once, pad_text_rows

#: Largest image we accept (4 MP): GLM-Image's published sizes reach 2048 on a side.
MAX_PIXELS = 2048 * 2048
MAX_SIDE = 2048
#: GlmImagePipeline.__call__'s defaults (the transformer config names no sample_size: 128 latent pixels).
DIFFUSERS_SAMPLE_SIZE = 128
DIFFUSERS_STEPS = 50
DIFFUSERS_GUIDANCE_SCALE = 1.5
DIFFUSERS_MAX_SEQUENCE_LENGTH = 2048
#: The conditioning key of each row's "prior tokens dropped" flag (True in the unconditional branch).
PRIOR_TOKEN_DROP = "prior_token_drop"
#: Input images one request may bring for editing. The reference sets no bound; each image lengthens the
#: prior's prompt and the DiT's attention keys by its tokens, and the model card shows one or two.
MAX_INPUT_IMAGES = 4
#: The processor's bound on an input image's aspect ratio (its `smart_resize` refuses longer ones).
MAX_INPUT_ASPECT = 4

#: zai-org/GLM-Image: the model card's settings are diffusers' defaults (1024x1024, 50 steps, guidance 1.5).
#: With input images and no size, the output takes the first image's size (see the module docstring).
GLM_IMAGE_DEFAULTS = SamplingDefaults(
    width=1024,
    height=1024,
    num_inference_steps=DIFFUSERS_STEPS,
    guidance_scale=DIFFUSERS_GUIDANCE_SCALE,
    max_sequence_length=DIFFUSERS_MAX_SEQUENCE_LENGTH,
    size_from_inputs=FirstInputWithinArea(MAX_PIXELS),
)

#: The quotes whose contents the glyph encoder renders, in the reference's order of search.
_GLYPH_PATTERNS = (r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」")


def glyph_texts(prompt: str) -> list[str]:
    """The quoted texts of a prompt, pattern by pattern (the reference's order); `[""]` when there are none."""
    found = [text for pattern in _GLYPH_PATTERNS for text in re.findall(pattern, prompt)]
    return found or [""]


@dataclasses.dataclass
class GlmImageComponents:
    glyph_tokenizer: Any
    glyph_encoder: T5EncoderModel
    processor: Any
    prior: GlmImageForConditionalGeneration
    transformer: GlmImageTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerScheduler
    vae_scale_factor: int


class GlmImageAdapter(FamilyAdapter):
    """GLM-Image under the engine's stages: glyph rows of each prompt's own length, prior tokens per request,
    unpacked (B, C, H, W) latents, classifier-free guidance with the prior (and the input images' keys and
    values) dropped in the unconditional branch."""

    def __init__(self, components: GlmImageComponents) -> None:
        self.c = components
        self.dtype = components.transformer.image_projector.proj.weight.dtype
        self.by_text_length = ByTextLength(self._forward)
        # The reference prepares input images for the VAE with this (PIL Lanczos resize, then [-1, 1]).
        self.image_processor = VaeImageProcessor(vae_scale_factor=components.vae_scale_factor)

    def _forward(self, **inputs: Any) -> torch.Tensor:
        # The reference guides in float32 whatever the model's dtype.
        return self.c.transformer(**inputs).float()

    @property
    def token_pixels(self) -> int:
        """Pixels per DiT token side: the VAE's factor times the patch size (16)."""
        return self.c.vae_scale_factor * self.c.transformer.config.patch_size

    def prior_token_count(self, request: Request) -> int:
        return (request.height // self.token_pixels) * (request.width // self.token_pixels)

    def check_requests(self, requests: Sequence[Request]) -> None:
        codebook = self.c.transformer.config.prior_vq_quantizer_codebook_size
        for request in requests:
            if request.negative_prompt is not None:
                raise invalid_request(
                    "negative_prompt",
                    "GLM-Image takes no negative prompt: its unconditional branch is the empty glyph text with the "
                    "prior tokens dropped",
                )
            if request.prior_token_ids:
                expected = self.prior_token_count(request)
                if len(request.prior_token_ids) != expected:
                    raise invalid_request(
                        "prior_token_ids",
                        f"prior_token_ids has {len(request.prior_token_ids)} ids; a {request.width}x{request.height} "
                        f"image takes {expected} (one per {self.token_pixels}x{self.token_pixels} pixels)",
                    )
                if max(request.prior_token_ids) >= codebook:
                    raise invalid_request("prior_token_ids", f"prior_token_ids must be codebook ids below {codebook}")

    def _glyph_embeds(self, text: str, max_sequence_length: int, device: torch.device) -> torch.Tensor:
        """`(tokens, dim)`: the encoder's states of every quoted text's real tokens, one after the other."""
        tokenizer = self.c.glyph_tokenizer
        ids = tokenizer(glyph_texts(text), max_length=max_sequence_length, truncation=True).input_ids
        # The reference prepends one pad token to every text when the prompt has an even number of them.
        ids = [[tokenizer.pad_token_id] * ((len(ids) + 1) % 2) + row for row in ids]
        longest = max(len(row) for row in ids)
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids], device=device)
        padded = torch.tensor([row + [tokenizer.pad_token_id] * (longest - len(row)) for row in ids], device=device)
        states = self.c.glyph_encoder(padded, attention_mask=mask).last_hidden_state
        return states[mask.bool()].to(self.dtype)

    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        # Each distinct text alone, as the reference encodes each prompt's glyphs (batched prompts it would
        # left-pad with zeros the DiT then attends to).
        embeds, lengths = pad_text_rows(
            each_text_once(texts, lambda text: self._glyph_embeds(text, max_sequence_length, device))
        )
        # The stage passes the prompts, then with classifier-free guidance the negative prompts (here ""): the
        # second half is the unconditional branch, whose prior tokens are dropped.
        cfg = bool(owners) and owners[0].cfg_enabled
        positives = len(texts) // 2 if cfg else len(texts)
        drop = torch.arange(len(texts), device=device) >= positives
        return {"encoder_hidden_states": embeds, TEXT_LENGTHS: lengths, PRIOR_TOKEN_DROP: drop}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # float32, as the reference combines float32 predictions with the Python float.
        return (torch.tensor([r.guidance_scale for r in rows], dtype=torch.float32, device=device),)

    def prior_tokens(
        self, requests: Sequence[Request], device: torch.device, images: PriorImages | None = None
    ) -> torch.Tensor:
        """`(requests, tokens)`: each request's own prior tokens, or those the prior samples from its seed
        (after the batch's input `images`, when editing)."""
        height, width = requests[0].height, requests[0].width
        tokens = torch.empty(len(requests), self.prior_token_count(requests[0]), dtype=torch.long, device=device)
        sampled = [i for i, r in enumerate(requests) if not r.prior_token_ids]
        for index, request in enumerate(requests):
            if request.prior_token_ids:
                tokens[index] = torch.tensor(request.prior_token_ids, dtype=torch.long, device=device)
        if sampled:
            tokens[sampled] = sample_prior_tokens(
                self.c.prior,
                self.c.processor,
                [requests[i].prompt for i in sampled],
                [requests[i].seed for i in sampled],
                height,
                width,
                device,
                images,
            ).to(device)
        return tokens

    def input_images(self, request: Request) -> list[Image.Image]:
        """The request's input images, refused (field `image`) where the prior's processor cannot read them."""
        image_processor = self.c.processor.image_processor
        smallest = image_processor.patch_size * image_processor.merge_size
        images = [load_image(path) for path in request.image_paths]
        for image in images:
            short, long = sorted(image.size)
            if short < smallest:
                raise invalid_request(
                    "image",
                    f"an input image is {image.width}x{image.height}; GLM-Image takes images of at least "
                    f"{smallest} pixels a side",
                )
            if long / short > MAX_INPUT_ASPECT:
                raise invalid_request(
                    "image",
                    f"an input image is {image.width}x{image.height}; GLM-Image takes aspect ratios up to "
                    f"{MAX_INPUT_ASPECT}:1",
                )
        return images

    def encode_images(self, state: BatchState) -> None:
        """The batch's input images (every request of a batch has the same: `image_paths` keys batches) as the
        prior reads them, and every DiT block's keys and values of their tokens."""
        images = encode_prior_images(self.c.prior, self.c.processor, self.input_images(state.requests[0]), state.device)
        state["prior_images"] = images
        state["condition_kv"] = self.condition_kv(images, state.device)

    def condition_kv(self, images: PriorImages, device: torch.device) -> list[LayerKV]:
        """Per DiT block, the keys and values of the input images' tokens, one image after the other (the
        reference's KV-cache "write" pass): each image VAE-encoded at its prior grid's size, normalised, and
        run at timestep 0 with its own prior tokens and no text."""
        vae = self.c.vae
        per_image = []
        for index, image in enumerate(images.images):
            rows, columns = images.dit_grid(index)
            height, width = rows * self.token_pixels, columns * self.token_pixels
            pixels = self.image_processor.preprocess(image, height=height, width=width)
            latents = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode()
            # (x - mean) / std in the DiT's dtype, divided as the reference divides.
            latents = normalize_latents(
                latents.to(self.dtype), vae.config.latents_mean, vae.config.latents_std, divide=True
            )
            size = torch.tensor([[height, width]], dtype=torch.float32, device=device)
            prior = images.tokens[index].to(device).unsqueeze(0)
            per_image.append(self.c.transformer.condition_kv(latents, prior, size))
        return [
            (torch.cat([kv[0] for kv in layer], dim=1), torch.cat([kv[1] for kv in layer], dim=1))
            for layer in zip(*per_image, strict=True)
        ]

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        requests = state.requests
        request = requests[0]
        # The prior is the per-request seeded part of GLM-Image's starting state, with the noise.
        prior = self.prior_tokens(requests, state.device, state.get("prior_images"))
        state.set_rows("prior_token_id", per_row(prior, requests))
        rows = int(state.row_owner.shape[0])
        # The reference builds the size conditions in the prompt embeddings' (the transformer's) dtype.
        size = torch.tensor([[request.height, request.width]], dtype=self.dtype, device=state.device)
        state.set_rows("target_size", size.repeat(rows, 1))
        state.set_rows("crop_coords", torch.zeros(rows, 2, dtype=self.dtype, device=state.device))
        factor = self.c.vae_scale_factor
        shape = (self.c.transformer.config.in_channels, request.height // factor, request.width // factor)
        return draw_noise(requests, shape, self.dtype).to(state.device)

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        request = state.requests[0]
        config = self.c.scheduler.config
        steps = request.num_inference_steps
        # Integer timesteps from num_train_timesteps down (the model's time is timestep - 1); sigmas are
        # those over num_train_timesteps, shifted for the image's token count.
        timesteps = np.linspace(config.num_train_timesteps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
        tokens = self.prior_token_count(request)
        mu = math.sqrt(tokens / config.base_image_seq_len) * config.max_shift + config.base_shift
        _, sigmas = self.c.scheduler.plan(
            steps, sigmas=timesteps / config.num_train_timesteps, mu=mu, device=state.device
        )
        return self.c.scheduler.start(torch.from_numpy(timesteps).to(state.device), sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def denoiser(self, expert: int) -> Denoiser:
        del expert  # one expert
        return self.by_text_length

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        rows = {
            "hidden_states": latents.to(self.dtype),
            "timestep": timestep.expand(latents.shape[0]) - 1,
            "prior_token_id": state["prior_token_id"],
            "target_size": state["target_size"],
            "crop_coords": state["crop_coords"],
        }
        # The input images' keys and values: the conditional branch reads them, the unconditional one runs
        # without them (the reference's KV cache in "read", then "skip" mode).
        cond_only = {"condition_kv": state["condition_kv"]} if "condition_kv" in state else {}
        return ModelInputs(rows=rows, cond_only=cond_only)

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        latents = denormalize_latents(
            state["latents"].to(vae.dtype), vae.config.latents_mean, vae.config.latents_std, multiply=True
        )
        # One row at a time: bounded activation memory, and each image is independent of its batch.
        images = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
        pixels = (torch.cat(images) * 0.5 + 0.5).clamp(0, 1)
        return pixels.cpu().permute(0, 2, 3, 1).float().numpy()


class GlmImagePipeline(FamilyPipeline):
    pipeline_class = "GlmImagePipeline"

    def __init__(self, components: GlmImageComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        token = components.vae_scale_factor * components.transformer.config.patch_size
        limits = image_limits(
            token=token,
            max_side=MAX_SIDE,
            max_pixels=MAX_PIXELS,
            max_sequence_length=tokenizer_limit(components.glyph_tokenizer, DIFFUSERS_MAX_SEQUENCE_LENGTH),
            max_steps=components.scheduler.config.num_train_timesteps,
            # The prior's grid: one token per 32 pixels (the DiT's 16-pixel tokens upsample it 2x).
            size_multiple=PRIOR_TOKEN_PIXELS,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="glm_image",
            task="text-to-image",
            guidance_mode="classifier_free",
            limits=limits,
            defaults=defaults,
            image_input="optional",
            max_input_images=MAX_INPUT_IMAGES,
            # The input images' keys and values are computed once per batch and set the attention's length.
            extra_batch_key_fields=("image_paths",),
            takes_prior_token_ids=True,
        )
        super().__init__(spec, GlmImageAdapter(components), options)
        self.c = components

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> GlmImagePipeline:
        def build_transformer(config: dict) -> GlmImageTransformer2DModel:
            return GlmImageTransformer2DModel.from_config(config, attention_backend=options.attention_backend)

        vae = load_pipeline_vae(AutoencoderKL, model_dir, options)
        glyph_dtype, prior_dtype = options.text_encoder_dtypes_for(
            ("text_encoder (ByT5 glyphs)", "vision_language_encoder (AR prior)")
        )
        components = GlmImageComponents(
            glyph_tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
            glyph_encoder=load_transformers_model(
                T5EncoderModel, model_dir / "text_encoder", options.device, glyph_dtype
            ),
            processor=AutoProcessor.from_pretrained(str(model_dir / "processor")),
            prior=load_transformers_model(
                GlmImageForConditionalGeneration, model_dir / "vision_language_encoder", options.device, prior_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            # diffusers: 2 ** (len(block_out_channels) - 1), 8 for GLM-Image's VAE.
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
        if defaults is None:
            size = DIFFUSERS_SAMPLE_SIZE * components.vae_scale_factor
            defaults = dataclasses.replace(GLM_IMAGE_DEFAULTS, width=size, height=size)
        return cls(components, options, defaults)
