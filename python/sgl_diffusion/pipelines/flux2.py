"""FLUX.2 (black-forest-labs/FLUX.2-dev) and FLUX.2-klein (FLUX.2-klein-4B, -9B, and the undistilled -base
models): one family adapter and two pipelines.

They match diffusers' `Flux2Pipeline` / `Flux2KleinPipeline` on the same weights and seed:

* prompts through a chat template into a causal language model, three of its hidden-state layers side by
  side per token, always `max_sequence_length` rows (`models/flux2/text_encoder.py`): Mistral Small 3.1
  after a fixed system prompt for dev, Qwen3 for klein;
* noise drawn per request from a CPU generator directly in the packed layout (128 channels = 32 latent
  channels x 2x2, one token per 2x2 latent patch), position ids (time, row, column, text index) for the
  4-axis RoPE;
* flow-match Euler with FLUX.2's empirical shift `mu` (a function of the image's token count and the
  number of steps);
* dev embeds the guidance scale (default 4.0) and has no negative prompt; klein has no guidance embedding:
  the step-distilled models (`is_distilled` in `model_index.json`: klein-4B / -9B, 4 steps) run without
  guidance, the base models with classifier-free guidance against the empty prompt when
  `guidance_scale > 1`;
* decoding denormalises the packed latents with the VAE's BatchNorm running statistics, unpacks the 2x2
  patches and decodes with diffusers' `AutoencoderKLFlux2`;
* or, with `--vae-path` naming fal's tiny autoencoder (`fal/FLUX.2-Tiny-AutoEncoder`,
  `models/flux2/tiny_autoencoder.py`), the packed latents go to it as they are: it was trained on the
  denoiser's normalised, patchified latents and encodes reference images into them too (`Flux2Codec`).

Reference images (multi-image conditioning; `generate(image=...)`, `--image-path`, `POST /v1/images/edits`),
for both: each image (at least 64 pixels a side, aspect at most 8:1) is shrunk to at most 1024x1024 pixels
at its own aspect, centre-cropped to multiples of 16, VAE-encoded (the distribution's mode), patchified and
normalised with the BatchNorm statistics; its tokens follow the generated image's in the DiT's sequence, with
time coordinate 10 for the first image, 20 for the second, ...; only the generated tokens' prediction steps.
The prompt encoding does not see the images. A request with images and no size gets the first image's
prepared size (`FirstInputWithinArea`, applied by the Rust core), as the reference
does. Requests batch only with requests that bring the very same image files (`image_paths` is an extra
batch-key field).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from ..errors import invalid_request
from ..loading import OtherVae, load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..loading.vae import latent_interface
from ..models.flux2 import (
    KLEIN_PROMPT,
    MISTRAL_PROMPT,
    Flux2Transformer2DModel,
    PromptFormat,
    encode_prompts,
    load_chat_tokenizer,
)
from ..models.flux2.text_encoder import MAX_PROMPT_TOKENS
from ..models.flux2.tiny_autoencoder import Flux2TinyAutoEncoder
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState, per_row
from .conditioning import ModelInputs, RowInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import Denoiser
from .images import load_image
from .latents import draw_noise
from .spec import FirstInputWithinArea, PipelineSpec, SamplingDefaults, image_limits, tokenizer_limit
from .text_lengths import each_text_once

#: Largest image we accept (4 MP, what FLUX.2 is published for); RoPE comes from position ids (no table), so
#: only the pixel bound limits a side.
MAX_PIXELS = 2048 * 2048
#: The reference pipelines' `__call__` defaults, for folders that are no known checkpoint.
DIFFUSERS_SAMPLE_SIZE = 128  # latent pixels per side: 1024 px with the 8x VAE
DIFFUSERS_STEPS = 50
DIFFUSERS_GUIDANCE_SCALE = 4.0
#: Step-distilled klein models run without guidance; 1.0 is the neutral value of the field.
NO_GUIDANCE_SCALE = 1.0
#: Reference images larger than this many pixels are shrunk to it (at their aspect) before encoding.
REFERENCE_MAX_AREA = 1024 * 1024
#: The reference pipelines' bounds on an input image (`Flux2ImageProcessor.check_image_input`).
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8
#: Time coordinate of reference image i's tokens: 10 * (i + 1) (the generated image sits at 0).
REFERENCE_TIME_STEP = 10
#: Reference images per request: BFL documents up to 4 for klein and recommends at most 6 for dev, whose
#: open reference code takes up to 10.
DEV_MAX_IMAGES = 10
KLEIN_MAX_IMAGES = 4
#: The fixed denoiser input naming how many trailing image tokens are reference images (not the model's).
REFERENCE_TOKENS = "reference_tokens"


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's timestep shift `mu` (BFL's `compute_empirical_mu`, in the reference's float64 arithmetic).

    Two lines in the image's token count were fitted, one for 10 and one for 200 steps; `mu` interpolates
    linearly between them in the number of steps. Past 4300 tokens the 200-step line holds for any steps.
    """
    slope_200, offset_200 = 0.00016927, 0.45666666
    slope_10, offset_10 = 8.73809524e-05, 1.89833333
    at_200 = slope_200 * image_seq_len + offset_200
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = slope_10 * image_seq_len + offset_10
    per_step = (at_200 - at_10) / 190.0
    return float(per_step * num_steps + (at_200 - 200.0 * per_step))


def text_position_ids(length: int, device: torch.device) -> torch.Tensor:
    """(length, 4) position ids of the text tokens: (0, 0, 0, index)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def image_position_ids(rows: int, columns: int, time: int, device: torch.device) -> torch.Tensor:
    """(rows * columns, 4) position ids of one image's packed tokens, row-major: (time, row, column, 0)."""
    ids = torch.zeros(rows, columns, 4, dtype=torch.long)
    ids[..., 0] = time
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 4).to(device)


def pack_tokens(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) patchified latents -> (B, h * w, C) tokens, as the reference lays them out: a transposed
    view (no copy), which later steps keep, so the denoiser sees the reference's memory layout too."""
    batch, channels, rows, columns = latents.shape
    return latents.reshape(batch, channels, rows * columns).permute(0, 2, 1)


def unpack_tokens(tokens: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Inverse of `pack_tokens`: (B, h * w, C) -> (B, C, h, w)."""
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], rows, columns)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2): each 2x2 patch's values as channels (c, dy, dx)."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch, channels * 4, height // 2, width // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    batch, channels, rows, columns = latents.shape
    latents = latents.reshape(batch, channels // 4, 2, 2, rows, columns).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch, channels // 4, rows * 2, columns * 2)


def batch_norm_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's BatchNorm mean and standard deviation per packed channel, shaped (1, C, 1, 1) in `like`'s
    dtype: `sqrt(running_var + eps)` computed in the buffers' dtype and then cast, as the reference does."""
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


class Flux2Codec:
    """Pixels <-> the denoiser's latents: (B, 128, h, w), 32 VAE channels in 2x2 patches, normalised by the
    BatchNorm running statistics of FLUX.2's VAE. With FLUX.2's own `AutoencoderKLFlux2` (32 channels at 8x) the
    patches and the statistics are applied here; subclasses take other VAEs."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype  # type: ignore[return-value]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent along a side, before the 2x2 patches (8 for every FLUX.2 VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # type: ignore[union-attr]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] in the VAE's dtype -> (B, 128, H/16, W/16): the distribution's mode, in
        2x2 patches, normalised."""
        latents = patchify(self.vae.encode(pixels).latent_dist.mode())  # type: ignore[operator]
        mean, std = batch_norm_statistics(self.vae, latents)
        return (latents - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 128, h, w) in the denoiser's dtype -> (B, 3, 16h, 16w) nominally in [-1, 1]: denormalised in that
        dtype (as the reference does), unpatchified, decoded in the VAE's."""
        mean, std = batch_norm_statistics(self.vae, latents)
        latents = unpatchify(latents * std + mean).to(self.vae.dtype)  # type: ignore[arg-type]
        return self.vae.decode(latents, return_dict=False)[0]  # type: ignore[operator]


class Flux2TinyCodec(Flux2Codec):
    """fal's `Flux2TinyAutoEncoder`: its latents are the denoiser's, so they pass as they are (no BatchNorm
    statistics, no 2x2 unpatchify); its inner autoencoder is the 8x step, its extra convolution the patch."""

    vae: Flux2TinyAutoEncoder

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_compression // 2

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype))


def reference_pixels(path: str, image_processor: Flux2ImageProcessor) -> torch.Tensor:
    """An input image as the reference pipelines prepare it: (1, 3, H, W) in [-1, 1], H and W multiples of 16."""
    image = load_image(path)
    width, height = image.size
    if min(width, height) < REFERENCE_MIN_SIDE:
        raise invalid_request(
            "image",
            f"an input image is {width}x{height}; FLUX.2 takes images of at least {REFERENCE_MIN_SIDE} pixels a side",
        )
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
        raise invalid_request(
            "image", f"an input image is {width}x{height}; FLUX.2 takes aspect ratios up to {REFERENCE_MAX_ASPECT}:1"
        )
    if width * height > REFERENCE_MAX_AREA:
        # Both sides scaled by sqrt(area ratio) and truncated, Lanczos-resampled, as the reference does.
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    multiple = image_processor.config.vae_scale_factor
    # The processor centre-crops to the 16-pixel grid ("crop" mode of Flux2ImageProcessor: no resampling).
    return image_processor.preprocess(
        image, height=height // multiple * multiple, width=width // multiple * multiple, resize_mode="crop"
    )


@dataclasses.dataclass
class Flux2Components:
    tokenizer: Any
    text_encoder: Mistral3ForConditionalGeneration | Qwen3ForCausalLM
    transformer: Flux2Transformer2DModel
    vae: AutoencoderKLFlux2 | Flux2TinyAutoEncoder
    codec: Flux2Codec
    scheduler: FlowMatchEulerScheduler
    vae_scale_factor: int
    prompt_format: PromptFormat


class Flux2Adapter(FamilyAdapter):
    """FLUX.2 under the engine's stages: stacked text-encoder layers, patchified latents as tokens with 4-axis
    position ids, the embedded guidance scale (dev) or classifier-free guidance (klein base)."""

    def __init__(self, components: Flux2Components) -> None:
        self.c = components
        self.dtype = components.transformer.x_embedder.weight.dtype
        # 8x VAE, then 2x2 patches: images are prepared on a 16-pixel grid.
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=components.vae_scale_factor * 2)

    def latent_grid(self, request: Request) -> tuple[int, int]:
        """Rows and columns of packed tokens: 8x VAE compression, then 2x2 patches."""
        factor = self.c.vae_scale_factor * 2
        return request.height // factor, request.width // factor

    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        del owners  # the texts alone decide the encoding
        # Each distinct text once, alone (see encode_prompts); the empty negative prompt requests share is
        # encoded once per batch.
        rows = each_text_once(
            texts,
            lambda text: encode_prompts(
                self.c.text_encoder,
                self.c.tokenizer,
                [text],
                self.c.prompt_format,
                max_sequence_length=max_sequence_length,
                device=device,
                dtype=self.dtype,
            ),
        )
        return {"encoder_hidden_states": torch.cat(rows)}

    def guidance_inputs(self, rows: Sequence[Request], device: torch.device) -> RowInputs:
        if not self.c.transformer.config.guidance_embeds:
            return {}
        # Float32, as the reference passes the embedded guidance; the model casts it.
        return {"guidance": torch.tensor([r.guidance_scale for r in rows], dtype=torch.float32, device=device)}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # In the transformer's dtype, as the reference multiplies its predictions by the Python float.
        return (torch.tensor([r.guidance_scale for r in rows], dtype=self.dtype, device=device),)

    def encode_images(self, state: BatchState) -> None:
        """Each request's reference images as packed, normalised VAE tokens one after another, and their
        position ids (every request of a batch has the same images: `image_paths` keys batches)."""
        encoded: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for request in state.requests:
            paths = tuple(request.image_paths)
            if paths not in encoded:
                encoded[paths] = self.reference_tokens(paths, state.device)
        tokens = torch.cat([encoded[tuple(request.image_paths)][0] for request in state.requests])
        state.set_rows("image_latents", per_row(tokens, state.requests).to(self.dtype))
        state["image_ids"] = encoded[tuple(state.requests[0].image_paths)][1]

    def reference_tokens(self, paths: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, N, C) tokens of the images at `paths`, in order, and their (N, 4) position ids."""
        codec = self.c.codec
        tokens, ids = [], []
        for index, path in enumerate(paths):
            pixels = reference_pixels(path, self.image_processor).to(device=device, dtype=codec.dtype)
            latents = codec.encode(pixels)
            tokens.append(pack_tokens(latents))
            time = REFERENCE_TIME_STEP * (index + 1)
            ids.append(image_position_ids(latents.shape[2], latents.shape[3], time, device))
        return torch.cat(tokens, dim=1), torch.cat(ids)

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        rows, columns = self.latent_grid(state.requests[0])
        channels = self.c.transformer.config.in_channels
        # Drawn in the packed channel layout (C * 4, h, w) and the denoiser's dtype, as the reference draws it.
        noise = draw_noise(state.requests, (channels, rows, columns), self.dtype).to(state.device)
        state["latent_ids"] = image_position_ids(rows, columns, 0, state.device)
        state["text_ids"] = text_position_ids(state.requests[0].max_sequence_length, state.device)
        return pack_tokens(noise)

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        # The generated image's tokens (reference images do not count), and the step count, set the shift.
        image_seq_len = state["latents"].shape[1]
        steps = state.requests[0].num_inference_steps
        timesteps, sigmas = self.c.scheduler.plan(steps, mu=empirical_mu(image_seq_len, steps), device=state.device)
        return self.c.scheduler.start(timesteps, sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def denoiser(self, expert: int) -> Denoiser:
        model = self.experts[expert]

        def generated_tokens_only(**inputs: object) -> torch.Tensor:
            # The DiT predicts every image token; the step needs the generated image's (the leading ones).
            references = inputs.pop(REFERENCE_TOKENS, 0)
            prediction = model(**inputs)
            return prediction[:, : prediction.shape[1] - references] if references else prediction  # type: ignore[operator]

        return generated_tokens_only

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        # diffusers casts t to the latent dtype before dividing; keep that rounding.
        rows = {"hidden_states": latents, "timestep": timestep.expand(latents.shape[0]).to(latents.dtype) / 1000}
        fixed = {"img_ids": state["latent_ids"], "txt_ids": state["text_ids"]}
        if "image_latents" in state:
            references = state["image_latents"]
            rows["hidden_states"] = torch.cat([latents, references], dim=1)
            fixed = {
                **fixed,
                "img_ids": torch.cat([fixed["img_ids"], state["image_ids"]]),
                REFERENCE_TOKENS: references.shape[1],
            }
        return ModelInputs(rows=rows, fixed=fixed)

    def decode(self, state: BatchState) -> np.ndarray:
        latents = unpack_tokens(state["latents"], *self.latent_grid(state.requests[0]))
        # One row at a time: bounded activation memory, and each image is independent of its batch.
        images = [self.c.codec.decode(row.unsqueeze(0)) for row in latents]
        pixels = (torch.cat(images) * 0.5 + 0.5).clamp(0, 1)
        return pixels.cpu().permute(0, 2, 3, 1).float().numpy()


class DevAdapter(Flux2Adapter):
    """FLUX.2-dev: the embedded guidance scale, no classifier-free guidance."""

    def check_requests(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if request.cfg_enabled:
                raise invalid_request(
                    "negative_prompt",
                    "FLUX.2-dev is guidance-distilled (guidance_scale feeds its guidance embedding) and its "
                    "reference pipeline takes no negative prompt: true CFG (negative_prompt with "
                    "true_cfg_scale > 1) is not supported",
                )


class KleinAdapter(Flux2Adapter):
    """klein: no guidance embedding; step-distilled models run without guidance, base models with
    classifier-free guidance against the negative prompt (the reference's: the empty prompt)."""

    def __init__(self, components: Flux2Components, distilled: bool) -> None:
        super().__init__(components)
        self.distilled = distilled

    def check_requests(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if self.distilled and request.cfg_enabled:
                raise invalid_request(
                    "guidance_scale",
                    "this FLUX.2-klein model is step-distilled without guidance: guidance_scale must be <= 1, "
                    f"got {request.guidance_scale}",
                )
            if request.negative_prompt and not request.cfg_enabled:
                raise invalid_request(
                    "negative_prompt",
                    "a negative prompt acts only through classifier-free guidance, which this request does not "
                    "run (it needs an undistilled klein model and guidance_scale > 1)",
                )


class _Flux2FamilyPipeline(FamilyPipeline):
    """What the FLUX.2 pipelines share: limits, loading; each names its text encoder and guidance."""

    family: ClassVar[str] = "flux2"
    text_encoder_class: ClassVar[type]
    text_encoder_name: ClassVar[str]
    prompt_format: ClassVar[PromptFormat]
    guidance_mode: ClassVar[str]
    max_input_images: ClassVar[int]

    def __init__(
        self, components: Flux2Components, adapter: Flux2Adapter, options: RuntimeOptions, defaults: SamplingDefaults
    ) -> None:
        token = components.vae_scale_factor * 2  # 8x VAE, then 2x2 latent patches
        limits = image_limits(
            token=token,
            max_side=MAX_PIXELS // token,
            max_pixels=MAX_PIXELS,
            max_sequence_length=tokenizer_limit(components.tokenizer, MAX_PROMPT_TOKENS),
            max_steps=components.scheduler.config.num_train_timesteps,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family=self.family,
            task="text-to-image",
            guidance_mode=self.guidance_mode,
            limits=limits,
            defaults=defaults,
            image_input="optional",
            max_input_images=self.max_input_images,
            # The reference images' token counts shape the batch's sequence.
            extra_batch_key_fields=("image_paths",),
        )
        super().__init__(spec, adapter, options)
        self.c = components

    @classmethod
    def load_components(cls, model_dir: Path, options: RuntimeOptions) -> Flux2Components:
        def build_transformer(config: dict) -> Flux2Transformer2DModel:
            return Flux2Transformer2DModel.from_config(config, attention_backend=options.attention_backend)

        # What the denoiser hands a VAE that takes its latents as they are: the own VAE's in 2x2 patches.
        own = latent_interface(read_config(model_dir / "vae"))
        packed = {
            "latent channels": own["latent channels"] * 4,
            "spatial compression": own["spatial compression"] * 2,
            "temporal compression": 1,
        }
        vae = load_pipeline_vae(
            AutoencoderKLFlux2, model_dir, options, others=(OtherVae(Flux2TinyAutoEncoder, packed),)
        )
        codec = Flux2TinyCodec(vae) if isinstance(vae, Flux2TinyAutoEncoder) else Flux2Codec(vae)
        (text_encoder_dtype,) = options.text_encoder_dtypes_for((cls.text_encoder_name,))
        return Flux2Components(
            tokenizer=load_chat_tokenizer(model_dir / "tokenizer"),
            text_encoder=load_transformers_model(
                cls.text_encoder_class, model_dir / "text_encoder", options.device, text_encoder_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,  # type: ignore[arg-type]
            codec=codec,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            vae_scale_factor=codec.vae_scale_factor,
            prompt_format=cls.prompt_format,
        )


def _read_model_index(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "model_index.json").read_text())


class Flux2Pipeline(_Flux2FamilyPipeline):
    """black-forest-labs/FLUX.2-dev: Mistral Small 3.1 prompts, embedded guidance, no negative prompt."""

    pipeline_class = "Flux2Pipeline"
    text_encoder_class = Mistral3ForConditionalGeneration
    text_encoder_name = "text_encoder (Mistral3)"
    prompt_format = MISTRAL_PROMPT
    max_input_images = DEV_MAX_IMAGES
    # The guidance scale feeds the embedding; the reference has no negative prompt, so true CFG is refused
    # (DevAdapter.check_requests).
    guidance_mode = "embedded_with_true_cfg"

    def __init__(self, components: Flux2Components, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        super().__init__(components, DevAdapter(components), options, defaults)

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> Flux2Pipeline:
        components = cls.load_components(model_dir, options)
        return cls(components, options, defaults or dev_diffusers_defaults(components))


class Flux2KleinPipeline(_Flux2FamilyPipeline):
    """black-forest-labs/FLUX.2-klein-4B / -9B (step-distilled) and -base: Qwen3 prompts, no guidance
    embedding."""

    pipeline_class = "Flux2KleinPipeline"
    text_encoder_class = Qwen3ForCausalLM
    text_encoder_name = "text_encoder (Qwen3)"
    prompt_format = KLEIN_PROMPT
    max_input_images = KLEIN_MAX_IMAGES
    guidance_mode = "classifier_free"

    def __init__(
        self, components: Flux2Components, options: RuntimeOptions, defaults: SamplingDefaults, distilled: bool
    ) -> None:
        super().__init__(components, KleinAdapter(components, distilled), options, defaults)
        self.distilled = distilled

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> Flux2KleinPipeline:
        # The reference reads `is_distilled` from model_index.json (False when absent).
        distilled = bool(_read_model_index(model_dir).get("is_distilled", False))
        components = cls.load_components(model_dir, options)
        return cls(components, options, defaults or klein_diffusers_defaults(components, distilled), distilled)


def _diffusers_defaults(components: Flux2Components, guidance_scale: float) -> SamplingDefaults:
    size = DIFFUSERS_SAMPLE_SIZE * components.vae_scale_factor
    return SamplingDefaults(
        width=size,
        height=size,
        num_inference_steps=DIFFUSERS_STEPS,
        guidance_scale=guidance_scale,
        max_sequence_length=MAX_PROMPT_TOKENS,
        size_from_inputs=FirstInputWithinArea(REFERENCE_MAX_AREA),
    )


def dev_diffusers_defaults(components: Flux2Components) -> SamplingDefaults:
    """Flux2Pipeline.__call__'s own defaults: 1024x1024, 50 steps, embedded guidance 4.0, 512 tokens."""
    return _diffusers_defaults(components, DIFFUSERS_GUIDANCE_SCALE)


def klein_diffusers_defaults(components: Flux2Components, distilled: bool) -> SamplingDefaults:
    """Flux2KleinPipeline.__call__'s own defaults: 1024x1024, 50 steps, guidance 4.0 (CFG against the empty
    prompt). A distilled folder ignores guidance in the reference; here its default is the neutral 1.0, which
    gives the same image (and a request asking for more is refused rather than silently ignored)."""
    return _diffusers_defaults(components, NO_GUIDANCE_SCALE if distilled else DIFFUSERS_GUIDANCE_SCALE)


#: black-forest-labs/FLUX.2-dev's model card: 1024x1024, 50 steps, embedded guidance 4.0. With reference images
#: and no size, the output takes the first image's size (at most 1024x1024 pixels), as the reference does.
FLUX2_DEV_DEFAULTS = SamplingDefaults(
    width=1024,
    height=1024,
    num_inference_steps=50,
    guidance_scale=4.0,
    max_sequence_length=MAX_PROMPT_TOKENS,
    size_from_inputs=FirstInputWithinArea(REFERENCE_MAX_AREA),
)
#: black-forest-labs/FLUX.2-klein-4B's (and -9B's) model card: step-distilled, 1024x1024, 4 steps, guidance 1.0.
FLUX2_KLEIN_DEFAULTS = dataclasses.replace(FLUX2_DEV_DEFAULTS, num_inference_steps=4, guidance_scale=1.0)
