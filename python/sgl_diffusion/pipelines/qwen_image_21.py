"""Qwen-Image 2.1 (Qwen/Qwen-Image-2.1): its family adapter and pipeline.

Matches diffusers' `QwenImage21Pipeline` on the same weights and seed:

* prompts through Qwen3-VL (`models/qwen_image_21/text_encoder.py`): the raw template, left padding, the
  last decoder layer's output before the final norm, the system turn dropped;
* noise drawn per request from a CPU generator as `(B, 1, 64, H/16, W/16)` and flattened to one token per
  latent pixel (2.1 takes latents unpatched);
* flow-match Euler with the dynamic shift from the token count, over the pipeline's configured
  `sample_sigmas` when the request's step count is theirs (the reference then ignores the step count; a
  request asking for another count gets `linspace(1, 1/N, N)`, the reference's own rule without them);
* plain true CFG (`neg + s * (pos - neg)`, no norm rescaling, no guidance embedding) when a negative
  prompt is given and `true_cfg_scale > 1`; the reference's default scale is 1 (the model is meant to run
  without guidance);
* the DiT (`models/qwen_image_21`) with the prefix (text) keys and values cached from the first step,
  as the reference's default `use_kv_cache=True` does;
* the VAE is diffusers' `AutoencoderKLQwenImage21`. It decodes RGBA; the engine's outputs are RGB, so
  the alpha channel is dropped (the RGB channels are the reference's).

Condition images (text-image-to-image; requests with `image_paths`), as the reference takes `image=`: each
image is read as RGBA and resized to about 1024x1024 pixels at its own aspect (multiples of 32). The text
encoder sees it (alpha composited over white) at its placeholder in the template, before the prompt; the
VAE encodes all four channels (the distribution's mode, normalised), and its latent tokens go before the
noise tokens, each at the encoder's image slots (one slot per 2x2 tokens) in the DiT's joint sequence.
Negative prompts are encoded with the same images. The output size defaults to the last image's aspect
at 1024x1024 pixels (the Rust core applies `LastInputAspectAtArea`), as the reference's default. Requests
batch only with requests that bring the very same image files (`image_paths` is an extra batch-key field).

Prompts keep only their real tokens and run grouped by length (`text_lengths.py`), so each output equals
its request run alone and the reference's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage21
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from ..errors import invalid_request
from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.qwen_image_21 import PrefixCache, QwenImage21Transformer2DModel
from ..models.qwen_image_21.text_encoder import Qwen21PromptEncoder
from ..models.qwen_image_21.vision import Qwen3VLImageTextProcessor, load_image_text_processor
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState, per_row
from .conditioning import ModelInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import Denoiser
from .images import load_image, size_at_area
from .latents import draw_noise, normalize_latents
from .spec import LastInputAspectAtArea, PipelineSpec, SamplingDefaults, image_limits
from .text_lengths import TEXT_LENGTHS, ByTextLength, pad_text_rows

#: The VAE compresses 16x and the DiT reads latents unpatched: one token per 16x16 pixels (diffusers'
#: hard-coded `vae_scale_factor`); sizes are multiples of 32 (the reference floors them to that).
VAE_SCALE_FACTOR = 16
SIZE_MULTIPLE = 2 * VAE_SCALE_FACTOR
#: Largest image we accept (4 MP) and longest side (a 4:1 strip at that bound), as for Qwen-Image.
MAX_PIXELS = 2048 * 2048
MAX_SIDE = 4096
#: The reference truncates no prompt; we refuse prompts over this many tokens (the DiT's RoPE table holds
#: 8192 positions for text and image blocks together).
MAX_PROMPT_TOKENS = 1024
#: QwenImage21Pipeline.__call__'s defaults: `output_resolution` 1024, 40 steps, `true_cfg_scale` 1.
DIFFUSERS_SIZE = 1024
DIFFUSERS_STEPS = 40
#: The model takes no guidance scale (the core refuses one in requests); a neutral value fills the field.
NO_GUIDANCE_SCALE = 1.0
#: The model-index key of the author's sampling sigmas (their count is the default step count).
SAMPLE_SIGMAS = "sample_sigmas"
#: Pixels of each condition image as the VAE and the text encoder see it, and of the default output with
#: condition images (the reference's `output_resolution ** 2`).
CONDITION_AREA = DIFFUSERS_SIZE * DIFFUSERS_SIZE
#: Condition images per request. The reference sets no bound; each 1024x1024 image adds 4096 DiT tokens
#: (and 1024 encoder tokens), so one request stays within a few forwards' cost.
MAX_CONDITION_IMAGES = 4
#: The conditioning key of each encoder row's image slots (bool, padded with False like the text rows).
IMAGE_SLOTS = "img_mask"


@dataclasses.dataclass(frozen=True)
class ConditionImage:
    """One condition image resized as the reference resizes it: `pixels` (1, 4, H, W) RGBA in [-1, 1] for the
    VAE, `resized` (RGBA) for the text encoder."""

    pixels: torch.Tensor
    resized: Image.Image

    @property
    def shape(self) -> tuple[int, int, int]:
        """Its (frames, rows, columns) of latent tokens."""
        return (1, self.pixels.shape[-2] // VAE_SCALE_FACTOR, self.pixels.shape[-1] // VAE_SCALE_FACTOR)


@dataclasses.dataclass
class QwenImage21Components:
    processor: Qwen3VLImageTextProcessor
    text_encoder: Qwen3VLForConditionalGeneration
    transformer: QwenImage21Transformer2DModel
    vae: AutoencoderKLQwenImage21
    scheduler: FlowMatchEulerScheduler
    #: The pipeline config's `sample_sigmas` (None: diffusers' linspace).
    sample_sigmas: tuple[float, ...] | None = None


class StepCaches:
    """The batch's prefix caches (`models/qwen_image_21.PrefixCache`), one per denoiser call of a step.

    A step calls the DiT in the same order every time (per guidance branch, per group of equal prompt
    length), so the i-th call of every step gets the i-th cache, checked against the call's shape. When
    rows leave the batch (cancelled requests) the cached rows no longer match: every cache starts over.
    """

    def __init__(self) -> None:
        self._caches: list[tuple[tuple[int, ...], PrefixCache]] = []
        self._rows = -1
        self._call = 0

    def begin_step(self, rows: int) -> None:
        if rows != self._rows:
            self._caches.clear()
            self._rows = rows
        self._call = 0

    def next(self, key: tuple[int, ...]) -> PrefixCache:
        index = self._call
        self._call += 1
        if index < len(self._caches) and self._caches[index][0] == key:
            return self._caches[index][1]
        cache = PrefixCache()
        del self._caches[index:]
        self._caches.append((key, cache))
        return cache


class QwenImage21Adapter(FamilyAdapter):
    """Qwen-Image 2.1 under the engine's stages (see the module docstring)."""

    def __init__(self, components: QwenImage21Components) -> None:
        self.c = components
        self.dtype = components.transformer.img_in.weight.dtype
        self.encoder = Qwen21PromptEncoder(components.text_encoder, components.processor)
        self.by_text_length = ByTextLength(self._forward)
        self.caching = components.transformer.config.causal_condition
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=VAE_SCALE_FACTOR, vae_latent_channels=components.vae.config.z_dim
        )

    @staticmethod
    def latent_size(request: Request) -> tuple[int, int]:
        """Latent rows and columns: the size floored to a multiple of 32 pixels, then 16x."""
        return 2 * (request.height // SIZE_MULTIPLE), 2 * (request.width // SIZE_MULTIPLE)

    def check_requests(self, requests: Sequence[Request]) -> None:
        for request in requests:
            tokens = self.encoder.token_count(request.prompt, len(request.image_paths))
            if tokens > request.max_sequence_length:
                raise invalid_request(
                    "max_sequence_length",
                    f"the templated prompt has {tokens} tokens, over max_sequence_length "
                    f"{request.max_sequence_length} (prompts are encoded whole, as the reference pipeline does)",
                )

    def condition_images(self, request: Request) -> list[ConditionImage]:
        """The request's condition images, resized as the reference resizes them (one resize from the
        original feeds the text encoder, another the VAE)."""
        images = []
        for path in request.image_paths:
            image = load_image(path, mode="RGBA")
            width, height = size_at_area(CONDITION_AREA, image.width / image.height)
            images.append(
                ConditionImage(
                    pixels=self.image_processor.preprocess(image, height=height, width=width),
                    resized=self.image_processor.resize(image, height=height, width=width),
                )
            )
        return images

    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        del max_sequence_length  # checked in check_requests; nothing is cropped
        if len(owners) != len(texts):
            raise ValueError("Qwen-Image 2.1 encodes each text with its request's condition images: pass owners")
        # Each distinct (text, images) alone, as the reference encodes a request's prompt and its negative
        # prompt: with other texts it would be padded, and the encoder's masked attention moves the last bits.
        rows: dict[tuple[str, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        resized: dict[tuple[str, ...], list[Image.Image]] = {}
        keys = [(text, tuple(owner.image_paths)) for text, owner in zip(texts, owners, strict=True)]
        for key, owner in zip(keys, owners, strict=True):
            text, paths = key
            if key in rows:
                continue
            if paths and paths not in resized:
                resized[paths] = [image.resized for image in self.condition_images(owner)]
            (encoded,) = self.encoder.encode([text], resized[paths] if paths else None, device)
            rows[key] = (encoded.embeds.to(self.dtype), encoded.image_slots)
        embeds, lengths = pad_text_rows([rows[key][0] for key in keys])
        slots = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for index, key in enumerate(keys):
            row_slots = rows[key][1]
            slots[index, : row_slots.shape[0]] = row_slots
        return {"encoder_hidden_states": embeds, TEXT_LENGTHS: lengths, IMAGE_SLOTS: slots}

    def encode_images(self, state: BatchState) -> None:
        """The condition images as normalised VAE latent tokens after one another, and their grids (every
        request of a batch has the same images: `image_paths` keys batches)."""
        request = state.requests[0]
        images = self.condition_images(request)
        tokens = torch.cat([self.condition_latents(image, state.device) for image in images], dim=1)
        rows = tokens.expand(len(state.requests), -1, -1)
        state.set_rows("image_latents", per_row(rows, state.requests))
        state["condition_shapes"] = [image.shape for image in images]

    def condition_latents(self, image: ConditionImage, device: torch.device) -> torch.Tensor:
        vae = self.c.vae
        # In the prompt embeddings' dtype (the transformer's), as the reference encodes.
        pixels = image.pixels.unsqueeze(2).to(device=device, dtype=self.dtype)  # (1, 4, 1, H, W)
        encoded = vae.encode(pixels).latent_dist.mode()
        # (x - mean) / std, divided as the reference divides (not multiplied by 1/std).
        encoded = normalize_latents(encoded, vae.config.latents_mean, vae.config.latents_std, divide=True)
        channels, rows, columns = encoded.shape[1], encoded.shape[-2], encoded.shape[-1]
        return encoded.view(1, channels, rows * columns).transpose(1, 2)

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # In the transformer's dtype, as the reference multiplies its predictions by the Python float.
        return (torch.tensor([r.true_cfg_scale for r in rows], dtype=self.dtype, device=device),)

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        channels = self.c.transformer.config.in_channels
        rows, columns = self.latent_size(state.requests[0])
        # The reference draws (B, 1, C, H, W) (the VAE's one frame) in the prompt embeddings' dtype, the
        # transformer's whenever it runs at all, then flattens the pixels into tokens (a transposed view).
        noise = draw_noise(state.requests, (1, channels, rows, columns), self.dtype).to(state.device)
        state["img_shapes"] = [*state.get("condition_shapes", []), (1, rows, columns)]
        state["prefix_caches"] = StepCaches()
        return noise[:, 0].view(noise.shape[0], channels, rows * columns).transpose(1, 2)

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        steps = state.requests[0].num_inference_steps
        sigmas = self.c.sample_sigmas if self.c.sample_sigmas and len(self.c.sample_sigmas) == steps else None
        timesteps, schedule = self.c.scheduler.plan(
            steps, state["latents"].shape[1], sigmas=sigmas, device=state.device
        )
        return self.c.scheduler.start(timesteps, schedule)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def denoiser(self, expert: int) -> Denoiser:
        del expert  # one expert
        return self.by_text_length

    def _forward(self, *, img_shapes: list[tuple[int, int, int]], prefix_caches: StepCaches, **inputs: Any) -> Any:
        """One DiT call for rows of one prompt length: the target image's prediction only."""
        hidden_states = inputs["hidden_states"]
        cache = None
        if self.caching:
            cache = prefix_caches.next((hidden_states.shape[0], inputs["encoder_hidden_states"].shape[1]))
        prediction = self.c.transformer(**inputs, img_shapes=[img_shapes], prefix_cache=cache)
        rows, columns = img_shapes[-1][1:]
        return prediction[:, -rows * columns :]

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        caches: StepCaches = state["prefix_caches"]
        caches.begin_step(latents.shape[0])
        # The reference casts t to the latent dtype before dividing; keep that rounding.
        hidden_states = latents
        if "image_latents" in state:
            hidden_states = torch.cat([state["image_latents"], latents], dim=1)
        rows = {"hidden_states": hidden_states, "timestep": timestep.expand(latents.shape[0]).to(latents.dtype) / 1000}
        return ModelInputs(rows=rows, fixed={"img_shapes": state["img_shapes"], "prefix_caches": caches})

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        rows, columns = self.latent_size(state.requests[0])
        latents = state["latents"]
        latents = latents.transpose(1, 2).reshape(latents.shape[0], -1, 1, rows, columns).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        # `x * std + mean`, as the reference denormalises (not divided by 1/std).
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std + mean
        # One row at a time: bounded activation memory, and each image is independent of its batch.
        images = [vae.decode(row.unsqueeze(0), return_dict=False)[0][:, :3, 0] for row in latents]
        pixels = (torch.cat(images) * 0.5 + 0.5).clamp(0, 1)
        return pixels.cpu().permute(0, 2, 3, 1).float().numpy()


class QwenImage21Pipeline(FamilyPipeline):
    pipeline_class = "QwenImage21Pipeline"

    def __init__(self, components: QwenImage21Components, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        limits = image_limits(
            token=VAE_SCALE_FACTOR,
            max_side=MAX_SIDE,
            max_pixels=MAX_PIXELS,
            max_sequence_length=MAX_PROMPT_TOKENS,
            max_steps=components.scheduler.config.num_train_timesteps,
            size_multiple=SIZE_MULTIPLE,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="qwen_image_21",
            task="text-image-to-image",
            guidance_mode="true_cfg",
            limits=limits,
            defaults=defaults,
            image_input="optional",
            max_input_images=MAX_CONDITION_IMAGES,
            extra_batch_key_fields=("image_paths",),
        )
        super().__init__(spec, QwenImage21Adapter(components), options)
        self.c = components

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> QwenImage21Pipeline:
        def build_transformer(config: dict) -> QwenImage21Transformer2DModel:
            return QwenImage21Transformer2DModel.from_config(config, attention_backend=options.attention_backend)

        vae = load_pipeline_vae(AutoencoderKLQwenImage21, model_dir, options)
        (text_encoder_dtype,) = options.text_encoder_dtypes_for(("text_encoder (Qwen3-VL)",))
        sigmas = json.loads((model_dir / "model_index.json").read_text()).get(SAMPLE_SIGMAS)
        components = QwenImage21Components(
            processor=load_image_text_processor(model_dir / "processor"),
            text_encoder=load_transformers_model(
                Qwen3VLForConditionalGeneration, model_dir / "text_encoder", options.device, text_encoder_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            sample_sigmas=tuple(float(s) for s in sigmas) if sigmas else None,
        )
        return cls(components, options, defaults or diffusers_defaults(components))


def diffusers_defaults(components: QwenImage21Components) -> SamplingDefaults:
    """QwenImage21Pipeline.__call__'s own defaults: 1024x1024 (with condition images: the last one's aspect
    at that area), as many steps as the configured sample sigmas (else 40), no guidance (`true_cfg_scale` 1,
    no negative prompt)."""
    steps = len(components.sample_sigmas) if components.sample_sigmas else DIFFUSERS_STEPS
    return SamplingDefaults(
        width=DIFFUSERS_SIZE,
        height=DIFFUSERS_SIZE,
        num_inference_steps=steps,
        guidance_scale=NO_GUIDANCE_SCALE,
        max_sequence_length=MAX_PROMPT_TOKENS,
        true_cfg_scale=1.0,
        negative_prompt=None,
        size_from_inputs=LastInputAspectAtArea(CONDITION_AREA),
    )
