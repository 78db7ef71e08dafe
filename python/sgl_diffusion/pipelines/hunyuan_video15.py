"""HunyuanVideo-1.5 text-to-video and image-to-video (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v,
-720p_t2v, -480p_i2v, -720p_i2v): its family adapter and pipelines.

Matches diffusers' `HunyuanVideo15Pipeline` on the same weights and seed: Qwen2.5-VL hidden states of the
chat-templated prompt and ByT5 features of its quoted text (`models/hunyuan_video15/text_encoder.py`), noise drawn
per request from a CPU generator in the transformer's dtype in the (B, C, F, H, W) latent layout (the reference
keeps its latents in that dtype), flow-match Euler over `linspace(1, 0)` sigmas with the static shift (the
checkpoint's, or the request's `flow_shift`), and classifier-free guidance against a negative prompt (default
empty) when `guidance_scale > 1`, the scale defaulting to the checkpoint's guider's. The DiT's input stacks the
noisy latents with the condition latents and mask, both zero for text-to-video. The VAE is diffusers'
`AutoencoderKLHunyuanVideo15`.

Image-to-video (`HunyuanVideo15ImageToVideoPipeline`) matches diffusers' pipeline of that name: the input image,
resized and center-cropped to the video's size, conditions the first latent frame through the VAE (its latent
mode, with a mask marking that frame) and every step through SigLIP's image tokens. diffusers takes no size: it
sizes the video by the image (the `target_size` bucket nearest its aspect), and so does the engine for a request
without a size; a request's own size is honoured as well (the image is then center-cropped to it).

Prompts keep only their real tokens (the reference pads them to 1000 and the glyph text to 256 with masks, and
adds 729 masked zero image tokens); rows whose two lengths agree run together without any mask
(`text_lengths.py`), so every output equals its request run alone and attention keeps its fastest kernels.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo15
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel

from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.hunyuan_video15 import HunyuanVideo15Transformer3DModel
from ..models.hunyuan_video15.text_encoder import MLLM_MAX_LENGTH, TEMPLATE_CROP, encode_prompt
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState, per_row
from .conditioning import ModelInputs, RowInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import Denoiser
from .images import load_image
from .latents import draw_noise, video_latent_grid
from .spec import FirstInputNearestBucket, PipelineLimits, PipelineSpec, SamplingDefaults, SizeBucket, tokenizer_limit
from .text_lengths import TEXT_LENGTHS, ByTextLength, each_text_once, pad_text_rows

#: The conditioning key of each row's number of glyph (ByT5) tokens, as `TEXT_LENGTHS` is the prompt's.
GLYPH_LENGTHS = "glyph_lengths"
#: The longest clip the model was trained for (121 frames, its default) and the largest frame (720p-class):
#: RoPE is computed from positions, so only memory bounds them.
MAX_FRAMES = 121
MAX_PIXELS = 1280 * 720
MAX_SIDE = 2048
#: HunyuanVideo-1.5's frame rate (the original repository's; diffusers' `__call__` has none).
FPS = 24
#: diffusers' default aspect ratio (width, height) when a request gives no size.
DEFAULT_ASPECT = (16, 9)


def size_buckets(target_size: int, patch: int) -> tuple[SizeBucket, ...]:
    """The sizes diffusers' HunyuanVideo-1.5 pipelines choose among (the original repository's resolution
    buckets): those with about `(target_size / patch)**2` patches and sides at most 4:1, each with its height /
    width ratio rounded to 5 decimals as the reference compares them."""
    patches = round((target_size / patch) ** 2)
    buckets: list[SizeBucket] = []
    # The reference walks (wide, high) patch counts and reads each pair as (height, width).
    wide, high = patches, 1
    while wide > 0:
        if max(wide, high) / min(wide, high) <= 4.0:
            height, width = wide * patch, high * patch
            buckets.append(SizeBucket(width=width, height=height, ratio=round(height / width, 5)))
        if (high + 1) * wide <= patches:
            high += 1
        else:
            wide -= 1
    return tuple(buckets)


def nearest_bucket(buckets: Sequence[SizeBucket], aspect: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the bucket whose ratio is nearest the aspect's (width, height) height / width, from
    the side of it that keeps the frame no more elongated (the rule `sgl_core::input_size::nearest_bucket`
    applies to input images)."""
    width, height = aspect
    wanted = height / width
    kept = [bucket for bucket in buckets if (bucket.ratio - wanted <= 0 if wanted >= 1 else bucket.ratio - wanted >= 0)]
    best = min(kept, key=lambda bucket: abs(bucket.ratio - wanted))
    return best.width, best.height


def bucket_size(target_size: int, patch: int, aspect: tuple[int, int] = DEFAULT_ASPECT) -> tuple[int, int]:
    """(width, height) diffusers' `HunyuanVideo15Pipeline` picks for `aspect` when given no size."""
    return nearest_bucket(size_buckets(target_size, patch), aspect)


@dataclasses.dataclass
class HunyuanVideo15Components:
    tokenizer: Any
    text_encoder: Qwen2_5_VLTextModel
    glyph_tokenizer: Any
    glyph_encoder: T5EncoderModel
    transformer: HunyuanVideo15Transformer3DModel
    vae: AutoencoderKLHunyuanVideo15
    scheduler: FlowMatchEulerScheduler
    scale_spatial: int
    scale_temporal: int
    guidance_scale: float
    #: Image-to-video only: SigLIP (`SiglipVisionModel`) and its `SiglipImageProcessor`.
    image_encoder: Any | None = None
    feature_extractor: Any | None = None


class HunyuanVideo15Adapter(FamilyAdapter):
    """HunyuanVideo-1.5 under the engine's stages: each prompt's real Qwen2.5-VL and ByT5 tokens, latents in the
    transformer's dtype stacked with the (zero) condition, classifier-free guidance."""

    def __init__(self, components: HunyuanVideo15Components) -> None:
        self.c = components
        self.dtype = components.transformer.proj_out.weight.dtype
        self.by_text_length = ByTextLength(
            components.transformer, more_texts={"encoder_hidden_states_2": GLYPH_LENGTHS}
        )
        # Input images are resized and center-cropped as the reference's image-to-video pipeline does.
        self.video_processor = VideoProcessor(vae_scale_factor=components.scale_spatial, do_resize=False)

    def latent_grid(self, request: Request) -> tuple[int, int, int]:
        return video_latent_grid(request, self.c.scale_temporal, self.c.scale_spatial)

    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        del owners  # the texts alone decide the encoding
        c = self.c
        encoded = each_text_once(
            texts,
            lambda text: encode_prompt(
                c.text_encoder, c.tokenizer, c.glyph_encoder, c.glyph_tokenizer, text, max_sequence_length, device
            ),
        )
        tokens, lengths = pad_text_rows([row.tokens.to(self.dtype) for row in encoded])
        glyph, glyph_lengths = pad_text_rows([row.glyph.to(self.dtype) for row in encoded])
        return {
            "encoder_hidden_states": tokens,
            TEXT_LENGTHS: lengths,
            "encoder_hidden_states_2": glyph,
            GLYPH_LENGTHS: glyph_lengths,
        }

    def guidance_inputs(self, rows: Sequence[Request], device: torch.device) -> RowInputs:
        del rows, device
        return {}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # The scale in the prediction's dtype, as the reference's guider multiplies by the float.
        return (torch.tensor([r.guidance_scale for r in rows], dtype=self.dtype, device=device),)

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        latent_channels = self.c.transformer.config.resolved_out_channels
        shape = (latent_channels, *self.latent_grid(state.requests[0]))
        # Drawn in the transformer's dtype, as the reference draws them (the CPU sampler differs per dtype).
        return draw_noise(state.requests, shape, dtype=self.dtype).to(state.device)

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        first = state.requests[0]
        steps = first.num_inference_steps
        # The reference's custom sigmas, linspace(1, 0, N + 1) without the final 0, shifted by the static shift.
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        timesteps, sigmas = self.c.scheduler.plan(steps, sigmas=sigmas, shift=first.flow_shift, device=state.device)
        return self.c.scheduler.start(timesteps, sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def denoiser(self, expert: int) -> Denoiser:
        del expert  # one expert
        return self.by_text_length

    def encode_images(self, state: BatchState) -> None:
        """Image-to-video: each request's image, resized and center-cropped to the request's size, as the condition
        (its VAE latent in the first latent frame, zeros after, and a mask marking the first frame) and as SigLIP
        image tokens. One request at a time, as the reference encodes its one image."""
        c = self.c
        if c.image_encoder is None or c.feature_extractor is None:
            raise ValueError("this HunyuanVideo-1.5 checkpoint has no image encoder: it is text-to-video")
        requests = state.requests
        first = requests[0]
        grid = self.latent_grid(first)
        conditions, tokens = [], []
        for request in requests:
            image = load_image(request.image_path)  # type: ignore[arg-type]  # the stage checked it is set
            image = self.video_processor.resize(image, height=first.height, width=first.width, resize_mode="crop")
            features = c.feature_extractor.preprocess(
                images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True
            ).to(device=state.device, dtype=next(c.image_encoder.parameters()).dtype)
            tokens.append(c.image_encoder(**features).last_hidden_state)
            pixels = self.video_processor.preprocess(image, height=first.height, width=first.width)
            pixels = pixels.to(state.device, c.vae.dtype).unsqueeze(2)  # (1, 3, 1, H, W)
            latent = c.vae.encode(pixels).latent_dist.mode() * c.vae.config.scaling_factor
            condition = torch.zeros(1, latent.shape[1] + 1, *grid, device=state.device, dtype=self.dtype)
            condition[:, :-1, :1] = latent.to(self.dtype)
            condition[:, -1:, :1] = 1.0  # the mask: the first latent frame is given
            conditions.append(condition)
        state.set_rows("condition", per_row(torch.cat(conditions), requests))
        state.set_rows("image_embeds", per_row(torch.cat(tokens), requests).to(self.dtype))

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        batch, channels, *grid = latents.shape
        if "condition" in state:
            condition = state["condition"]
        else:
            # Text-to-video: the condition latents and their mask are zeros.
            condition = latents.new_zeros(batch, channels + 1, *grid)
        rows = {
            "hidden_states": torch.cat((latents, condition), dim=1),
            "timestep": timestep.expand(batch).to(latents.dtype),
            "image_embeds": state.get("image_embeds"),
        }
        return ModelInputs(rows=rows)

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        latents = state["latents"].to(vae.dtype) / vae.config.scaling_factor
        # One video at a time: bounded memory, and each output independent of its batch.
        videos = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
        pixels = (torch.cat(videos) * 0.5 + 0.5).clamp(0, 1)  # (B, C, T, H, W)
        return pixels.permute(0, 2, 3, 4, 1).float().cpu().numpy()


def hunyuan_video15_limits(components: HunyuanVideo15Components) -> PipelineLimits:
    config = components.transformer.config
    token = components.scale_spatial * config.patch_size  # 16: the VAE's compression
    return PipelineLimits(
        size_multiple=token,
        min_size=token,
        max_side=MAX_SIDE,
        max_pixels=MAX_PIXELS,
        max_frames=MAX_FRAMES,
        frame_rule="four_k_plus_one",
        # The tokenizer bounds the templated prompt: the template's prefix comes on top of the prompt.
        max_sequence_length=tokenizer_limit(components.tokenizer, MLLM_MAX_LENGTH + TEMPLATE_CROP) - TEMPLATE_CROP,
        max_steps=components.scheduler.config.num_train_timesteps,
        token_size=token,
        frames_per_latent=components.scale_temporal * config.patch_size_t,
    )


class HunyuanVideo15Pipeline(FamilyPipeline):
    pipeline_class = "HunyuanVideo15Pipeline"
    task = "text-to-video"
    image_input = "none"

    def __init__(
        self, components: HunyuanVideo15Components, options: RuntimeOptions, defaults: SamplingDefaults
    ) -> None:
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="hunyuan_video15",
            task=self.task,
            image_input=self.image_input,
            guidance_mode="classifier_free",
            limits=hunyuan_video15_limits(components),
            defaults=defaults,
            output="video",
            supports_flow_shift=True,
        )
        super().__init__(spec, HunyuanVideo15Adapter(components), options)
        self.c = components

    @classmethod
    def load_image_encoder(cls, model_dir: Path, options: RuntimeOptions) -> dict[str, Any]:
        """The image encoder's components (none for text-to-video)."""
        del model_dir, options
        return {}

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> HunyuanVideo15Pipeline:
        def build_transformer(config: dict) -> HunyuanVideo15Transformer3DModel:
            return HunyuanVideo15Transformer3DModel.from_config(config, attention_backend=options.attention_backend)

        scheduler = FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler"))
        if scheduler.config.use_dynamic_shifting:
            # HunyuanVideo15Pipeline passes no mu to set_timesteps, which the reference rejects for dynamic shifting.
            raise ValueError(f"{model_dir}: HunyuanVideo-1.5 with a dynamically shifted scheduler is not supported")
        guider = read_guider_config(model_dir)
        vae = load_pipeline_vae(AutoencoderKLHunyuanVideo15, model_dir, options)
        qwen_dtype, byt5_dtype = options.text_encoder_dtypes_for(("text_encoder (Qwen2.5-VL)", "text_encoder_2 (ByT5)"))
        components = HunyuanVideo15Components(
            tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
            text_encoder=load_transformers_model(
                Qwen2_5_VLTextModel, model_dir / "text_encoder", options.device, qwen_dtype
            ),
            glyph_tokenizer=ByT5Tokenizer.from_pretrained(str(model_dir / "tokenizer_2")),
            glyph_encoder=load_transformers_model(
                T5EncoderModel, model_dir / "text_encoder_2", options.device, byt5_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=scheduler,
            scale_spatial=vae.config.spatial_compression_ratio,
            scale_temporal=vae.config.temporal_compression_ratio,
            # diffusers' ClassifierFreeGuidance default when the folder has no guider config.
            guidance_scale=float(guider.get("guidance_scale", 7.5)),
            **cls.load_image_encoder(model_dir, options),
        )
        if defaults is None:
            defaults = cls.reference_defaults(components)
        return cls(components, options, defaults)

    @classmethod
    def reference_defaults(cls, components: HunyuanVideo15Components) -> SamplingDefaults:
        return diffusers_defaults(components)


class HunyuanVideo15ImageToVideoPipeline(HunyuanVideo15Pipeline):
    """The same stages; every request brings the first frame, encoded by the VAE and by SigLIP."""

    pipeline_class = "HunyuanVideo15ImageToVideoPipeline"
    task = "image-to-video"
    image_input = "required"

    @classmethod
    def reference_defaults(cls, components: HunyuanVideo15Components) -> SamplingDefaults:
        """The text-to-video defaults, but a request without a size is sized by its image as diffusers sizes
        every image-to-video request: the `target_size` bucket nearest the image's aspect (the Rust core picks
        it from the image's header)."""
        buckets = size_buckets(components.transformer.config.target_size, components.scale_spatial)
        return dataclasses.replace(diffusers_defaults(components), size_from_inputs=FirstInputNearestBucket(buckets))

    @classmethod
    def load_image_encoder(cls, model_dir: Path, options: RuntimeOptions) -> dict[str, Any]:
        from transformers import SiglipImageProcessor, SiglipVisionModel

        # In the DiT's precision, as Wan's CLIP image encoder.
        return {
            "image_encoder": load_transformers_model(
                SiglipVisionModel, model_dir / "image_encoder", options.device, options.dit_dtype
            ),
            "feature_extractor": SiglipImageProcessor.from_pretrained(str(model_dir / "feature_extractor")),
        }


def read_guider_config(model_dir: Path) -> dict[str, Any]:
    """The folder's `guider/guider_config.json` (diffusers' ClassifierFreeGuidance defaults without one),
    refusing settings the engine's plain CFG does not run."""
    path = model_dir / "guider" / "guider_config.json"
    guider: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if guider.get("_class_name", "ClassifierFreeGuidance") != "ClassifierFreeGuidance":
        raise ValueError(f"{path}: guider {guider['_class_name']} is not supported (ClassifierFreeGuidance is)")
    unsupported = {
        "guidance_rescale": 0.0,
        "use_original_formulation": False,
        "start": 0.0,
        "stop": 1.0,
        "enabled": True,
    }
    for key, value in unsupported.items():
        if guider.get(key, value) != value:
            raise ValueError(f"{path}: {key}={guider[key]!r} is not supported (only {value!r})")
    return guider


def diffusers_defaults(components: HunyuanVideo15Components) -> SamplingDefaults:
    """HunyuanVideo15Pipeline.__call__'s defaults read through the folder: the size its transformer's
    `target_size` buckets give 16:9, 121 frames, 50 steps, the guider's scale, the scheduler's shift, an empty
    negative prompt, and HunyuanVideo-1.5's frame rate."""
    width, height = bucket_size(components.transformer.config.target_size, components.scale_spatial)
    return SamplingDefaults(
        width=width,
        height=height,
        num_frames=121,
        fps=FPS,
        num_inference_steps=50,
        guidance_scale=components.guidance_scale,
        max_sequence_length=MLLM_MAX_LENGTH,
        negative_prompt="",
        flow_shift=components.scheduler.config.shift,
    )
