"""Wan text-to-video and image-to-video: Wan2.1 T2V and I2V, Wan2.2 A14B (two experts), Wan2.2 TI2V-5B.

Matches diffusers' `WanPipeline` / `WanImageToVideoPipeline` on the same weights and seed: UMT5
embeddings of the cleaned prompt (trimmed to its length and zero-padded), noise per request from a
CPU generator, UniPC in flow mode or flow-match Euler (whichever the folder's scheduler config names)
with the request's `flow_shift`, classifier-free guidance when
`guidance_scale > 1`, the A14B expert switch at `boundary_ratio`, per-token timesteps for TI2V-5B.
Image conditioning: the first frame encoded by the VAE (concatenated with a frame mask for Wan2.1 I2V
and A14B I2V; pasted over the first latent frame for TI2V-5B) and CLIP image tokens for Wan2.1 I2V.
diffusers' `AutoencoderKLWan` encodes and decodes, and its `VideoProcessor` resizes input images.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from ..errors import invalid_request
from ..loading import load_diffusers_model, load_native_model, load_transformers_model, read_config
from ..models.wan import WanTransformer3DModel
from ..models.wan.vae import WanVAEDecoder
from ..runtime.options import RuntimeOptions
from ..schedulers import UniPCFlowScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerScheduler, FlowMatchEulerState
from ..schedulers.unipc_flow import UniPCFlowState
from .base import BatchState, PipelineLimits, ProgressFn, SamplingDefaults, Stage, StagedPipeline, tokenizer_limit
from .common import draw_noise, guided_forward, per_row, shared_value, use_batched_cfg

#: UMT5 context length the Wan DiTs were trained with.
TEXT_MAX_LENGTH = 512
#: Longest video we accept (4k+1 frames; Wan2.2 TI2V-5B defaults to 121) and largest frame (1080p-class), whatever
#: the RoPE table would allow: one clip's activations and its whole-clip VAE decode must fit in memory.
MAX_FRAMES = 241
MAX_PIXELS = 1920 * 1088
#: Scheduler classes a Wan folder may name, with the sampler that reproduces each.
SCHEDULERS: dict[str, type[UniPCFlowScheduler | FlowMatchEulerScheduler]] = {
    "UniPCMultistepScheduler": UniPCFlowScheduler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerScheduler,
}


def build_scheduler(config: dict[str, Any], where: Path) -> UniPCFlowScheduler | FlowMatchEulerScheduler:
    """The sampler for a ``scheduler_config.json`` (UniPC when it names no class, as before)."""
    name = config.get("_class_name", "UniPCMultistepScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"{where}: Wan with {name} is not supported (supported: {', '.join(SCHEDULERS)})")
    scheduler = SCHEDULERS[name].from_config(config)
    if isinstance(scheduler, FlowMatchEulerScheduler) and scheduler.config.use_dynamic_shifting:
        # WanPipeline passes no mu to set_timesteps, which the reference rejects for dynamic shifting.
        raise ValueError(f"{where}: Wan with FlowMatchEulerDiscreteScheduler needs use_dynamic_shifting=false")
    return scheduler


def default_flow_shift(scheduler: UniPCFlowScheduler | FlowMatchEulerScheduler) -> float:
    """The config's own shift: ``flow_shift`` for UniPC, ``shift`` for flow-match Euler."""
    if isinstance(scheduler, FlowMatchEulerScheduler):
        return scheduler.config.shift
    return scheduler.config.flow_shift


def plan_schedule(
    scheduler: UniPCFlowScheduler | FlowMatchEulerScheduler, num_inference_steps: int, flow_shift: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` as WanPipeline's ``set_timesteps(N)``, with ``flow_shift`` overriding the config's
    shift (a reference scheduler built with it). UniPC timesteps are int64, Euler's float32."""
    if isinstance(scheduler, FlowMatchEulerScheduler):
        return scheduler.plan_default(num_inference_steps, shift=flow_shift)
    return scheduler.plan(num_inference_steps, flow_shift=flow_shift)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (ftfy, double HTML unescape, whitespace collapse), so token ids match."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclasses.dataclass
class WanComponents:
    tokenizer: Any
    text_encoder: UMT5EncoderModel
    transformer: WanTransformer3DModel
    #: The low-noise expert of Wan2.2 A14B, used below `boundary_ratio`.
    transformer_2: WanTransformer3DModel | None
    boundary_ratio: float | None
    #: Wan2.2 TI2V-5B feeds one timestep per video token.
    expand_timesteps: bool
    #: diffusers' VAE: the encoder (image-to-video), latent statistics, and tiled decoding.
    vae: AutoencoderKLWan
    scheduler: UniPCFlowScheduler | FlowMatchEulerScheduler
    scale_spatial: int
    scale_temporal: int
    #: Wan2.1 I2V: CLIP vision tower whose penultimate hidden states condition the DiT.
    image_encoder: CLIPVisionModel | None = None
    image_processor: CLIPImageProcessor | None = None
    #: Our whole-clip decoder over the VAE's own decoder weights (None: decode with diffusers' tiles).
    decoder: WanVAEDecoder | None = None


class WanPipeline(StagedPipeline):
    pipeline_class = "WanPipeline"
    family = "wan"
    task = "text-to-video"
    guidance_mode = "classifier_free"
    supports_flow_shift = True
    output = "video"

    def __init__(self, components: WanComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        config = components.transformer.config
        patch = config.patch_size
        multiple = components.scale_spatial * patch[1]  # 16 for Wan2.1, 32 for TI2V-5B
        # The DiT's RoPE table has rope_max_seq_len positions per axis of the latent grid (the reference
        # fails beyond it): the longest side and clip this checkpoint can run at all.
        max_side = config.rope_max_seq_len * components.scale_spatial * min(patch[1], patch[2])
        rope_frames = (config.rope_max_seq_len * patch[0] - 1) * components.scale_temporal + 1
        limits = PipelineLimits(
            size_multiple=multiple,
            min_size=multiple,
            max_side=max_side,
            max_pixels=min(MAX_PIXELS, max_side * max_side),
            max_frames=min(MAX_FRAMES, rope_frames),
            frame_rule="four_k_plus_one",
            max_sequence_length=tokenizer_limit(components.tokenizer, TEXT_MAX_LENGTH),
            max_steps=components.scheduler.config.num_train_timesteps,
            token_size=multiple,
            frames_per_latent=components.scale_temporal * patch[0],
        )
        super().__init__(options, limits, defaults)
        self.c = components
        self.supports_guidance_scale_2 = components.transformer_2 is not None
        self.video_processor = VideoProcessor(vae_scale_factor=components.scale_spatial)
        if components.expand_timesteps:
            # TI2V-5B: one folder serves text-to-video and image-to-video.
            self.image_input = "optional"
            self.task = "text-image-to-video"

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> WanPipeline:
        index = json.loads((model_dir / "model_index.json").read_text())
        scheduler = build_scheduler(read_config(model_dir / "scheduler"), model_dir)

        def build_transformer(config: dict) -> WanTransformer3DModel:
            return WanTransformer3DModel.from_config(config, attention_backend=options.attention_backend)

        def present(component: str) -> bool:
            return (index.get(component) or [None])[0] is not None

        has_second_expert = present("transformer_2")
        vae = load_diffusers_model(AutoencoderKLWan, model_dir / "vae", options.device, options.vae_dtype)
        if options.vae_tiling:
            vae.enable_tiling()
        (text_encoder_dtype,) = options.text_encoder_dtypes_for(("text_encoder (UMT5)",))
        components = WanComponents(
            tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
            text_encoder=load_transformers_model(
                UMT5EncoderModel, model_dir / "text_encoder", options.device, text_encoder_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            transformer_2=(
                load_native_model(build_transformer, model_dir / "transformer_2", options.device, options.dit_dtype)
                if has_second_expert
                else None
            ),
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            vae=vae,
            scheduler=scheduler,
            scale_spatial=vae.config.scale_factor_spatial,
            scale_temporal=vae.config.scale_factor_temporal,
            image_encoder=(
                load_transformers_model(CLIPVisionModel, model_dir / "image_encoder", options.device, options.dit_dtype)
                if present("image_encoder")
                else None
            ),
            image_processor=(
                CLIPImageProcessor.from_pretrained(str(model_dir / "image_processor"))
                if present("image_processor")
                else None
            ),
            decoder=None if options.vae_tiling else WanVAEDecoder.from_diffusers(vae),
        )
        if defaults is None:
            defaults = diffusers_defaults(components)
        return cls(components, options, defaults)

    def denoisers(self) -> list[torch.nn.Module]:
        return [model for model in (self.c.transformer, self.c.transformer_2) if model is not None]

    def stages(self, progress: ProgressFn) -> list[Stage]:
        return [
            CheckShapes(self),
            EncodeText(self),
            EncodeImage(self),
            PrepareLatents(self),
            Denoise(self, progress),
            DecodeVideos(self),
        ]


class WanImageToVideoPipeline(WanPipeline):
    """The same stages; the checkpoint's class says every request brings an image."""

    pipeline_class = "WanImageToVideoPipeline"
    task = "image-to-video"
    image_input = "required"

    def __init__(self, components: WanComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        super().__init__(components, options, defaults)
        self.image_input = "required"
        self.task = "image-to-video"


def diffusers_defaults(components: WanComponents) -> SamplingDefaults:
    """WanPipeline.__call__'s defaults, for folders that are no known checkpoint."""
    return SamplingDefaults(
        width=832,
        height=480,
        num_frames=81,
        fps=16,
        num_inference_steps=50,
        guidance_scale=5.0,
        guidance_scale_2=None,
        max_sequence_length=TEXT_MAX_LENGTH,
        negative_prompt="",
        flow_shift=default_flow_shift(components.scheduler),
    )


class WanStage(Stage):
    def __init__(self, pipeline: WanPipeline) -> None:
        self.pipeline = pipeline
        self.c = pipeline.c


class CheckShapes(WanStage):
    """Input validation: the batch must share shapes; latent sizes follow the VAE's compression."""

    name = "input_validation"
    outputs = ("latent_frames", "latent_height", "latent_width")

    def run(self, state: BatchState) -> None:
        for field in ("width", "height", "num_frames", "num_inference_steps", "max_sequence_length", "cfg_enabled"):
            shared_value(state.requests, field)
        if len({r.image_path is None for r in state.requests}) != 1:
            raise RuntimeError("the scheduler batched image-conditioned and text-only requests together")
        first = state.requests[0]
        state["latent_frames"] = (first.num_frames - 1) // self.c.scale_temporal + 1
        state["latent_height"] = first.height // self.c.scale_spatial
        state["latent_width"] = first.width // self.c.scale_spatial


class EncodeText(WanStage):
    """UMT5 embeddings of the cleaned prompts (and negative prompts for CFG), one row per output."""

    name = "text_encoding"
    outputs = ("prompt_embeds",)

    def run(self, state: BatchState) -> None:
        requests = state.requests
        seq_len = requests[0].max_sequence_length
        cfg = requests[0].cfg_enabled
        texts = [r.prompt for r in requests] + ([r.negative_prompt or "" for r in requests] if cfg else [])
        embeds = self.encode(texts, seq_len, state.device).to(self.c.transformer.patch_embedding.weight.dtype)
        n = len(requests)
        state.set_rows("prompt_embeds", per_row(embeds[:n], requests))
        if cfg:
            state.set_rows("negative_prompt_embeds", per_row(embeds[n:], requests))
        rows = state.row_owner.tolist()
        for key, field in (("guidance_scale", "guidance_scale"), ("guidance_scale_2", "guidance_scale_2")):
            values = [getattr(requests[i], field) or requests[i].guidance_scale for i in rows]
            state.set_rows(key, torch.tensor(values, dtype=torch.float32, device=state.device))

    def encode(self, texts: list[str], seq_len: int, device: torch.device) -> torch.Tensor:
        tokens = self.c.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            max_length=seq_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.c.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        # Keep each prompt's real tokens and zero the padding, as the DiT was trained.
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
        return hidden * keep[..., None].to(hidden.dtype)


def load_image(path: str) -> Image.Image:
    """The input image in RGB. PIL reads the size from the header first: an image over its
    decompression-bomb bound (about 89 megapixels) is an invalid request, never decoded (a 17 KB PNG
    can declare 12 000 x 12 000 pixels, 1.9 GB once decoded). Messages reach HTTP clients, so they
    name the file, never the server's folder it is in."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise invalid_request("image", f"the input image has too many pixels to decode: {err}") from err
    except UnidentifiedImageError as err:
        raise invalid_request("image", f"the input image {name} is not an image that can be read") from err
    except OSError as err:
        # An OSError's text quotes the full path (`[Errno 2] No such file: '/srv/...'`); strerror does not.
        raise invalid_request("image", f"the input image {name} cannot be read: {err.strerror or err}") from err


class EncodeImage(WanStage):
    """Image conditioning for image-to-video: the VAE latent of the first frame (with the frame mask
    for Wan2.1 I2V / A14B I2V, or pasted over the first latent frame for TI2V-5B) and, where the DiT
    takes them, CLIP image tokens. One request at a time, as diffusers encodes a batch of one."""

    name = "image_encoding"
    inputs = ("latent_frames", "latent_height", "latent_width")

    def run(self, state: BatchState) -> None:
        requests = state.requests
        if requests[0].image_path is None:
            return
        c = self.c
        first = requests[0]
        conditions, tokens = [], []
        for request in requests:
            image = load_image(request.image_path)
            if c.image_encoder is not None and c.transformer.config.image_dim is not None:
                tokens.append(self.clip_tokens(image, state.device))
            pixels = self.video_processor_preprocess(image, first.height, first.width, state.device)
            conditions.append(self.latent_condition(pixels, first.num_frames, state))
        state.set_rows("condition", per_row(torch.cat(conditions), requests))
        if tokens:
            dtype = c.transformer.patch_embedding.weight.dtype
            state.set_rows("image_embeds", per_row(torch.cat(tokens), requests).to(dtype))
        if c.expand_timesteps:
            mask = torch.ones(
                1, 1, state["latent_frames"], state["latent_height"], state["latent_width"], device=state.device
            )
            mask[:, :, 0] = 0
            state["first_frame_mask"] = mask

    def clip_tokens(self, image: Image.Image, device: torch.device) -> torch.Tensor:
        c = self.c
        inputs = c.image_processor(images=image, return_tensors="pt").to(device)
        return c.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]

    def video_processor_preprocess(
        self, image: Image.Image, height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        return self.pipeline.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)

    def latent_condition(self, pixels: torch.Tensor, num_frames: int, state: BatchState) -> torch.Tensor:
        c = self.c
        vae = c.vae
        image = pixels.unsqueeze(2)  # (1, 3, 1, H, W)
        if c.expand_timesteps:
            video = image
        else:
            # The first frame, then black frames: the VAE sees a whole clip whose start is fixed.
            video = torch.cat([image, image.new_zeros(1, 3, num_frames - 1, *image.shape[-2:])], dim=2)
        encoded = vae.encode(video.to(vae.dtype)).latent_dist.mode().to(state.device, torch.float32)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(encoded.device, encoded.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(encoded.device, encoded.dtype)
        encoded = (encoded - mean) * inv_std
        if c.expand_timesteps:
            return encoded
        return torch.cat([self.frame_mask(num_frames, state).to(encoded.device), encoded], dim=1)

    def frame_mask(self, num_frames: int, state: BatchState) -> torch.Tensor:
        """Which pixel frames are given (only the first), folded to latent frames as the DiT expects:
        (1, scale_temporal, latent_frames, h, w)."""
        height, width, scale = state["latent_height"], state["latent_width"], self.c.scale_temporal
        mask = torch.zeros(1, 1, num_frames, height, width)
        mask[:, :, 0] = 1
        first = mask[:, :, 0:1].repeat_interleave(scale, dim=2)
        mask = torch.cat([first, mask[:, :, 1:]], dim=2)
        return mask.view(1, -1, scale, height, width).transpose(1, 2)


class PrepareLatents(WanStage):
    name = "latent_preparation"
    inputs = ("latent_frames", "latent_height", "latent_width")
    outputs = ("latents",)

    def run(self, state: BatchState) -> None:
        # Noise has the VAE's channels; the DiT's extra input channels (I2V) are the image condition.
        channels = self.c.vae.config.z_dim
        shape = (channels, state["latent_frames"], state["latent_height"], state["latent_width"])
        # diffusers keeps Wan latents in float32 and casts to the DiT dtype per forward.
        state.set_rows("latents", draw_noise(state.requests, shape).to(state.device))


class Denoise(WanStage):
    name = "denoising"
    inputs = ("latents", "prompt_embeds", "guidance_scale")
    outputs = ("latents",)

    def __init__(self, pipeline: WanPipeline, progress: ProgressFn) -> None:
        super().__init__(pipeline)
        self.progress = progress

    def run(self, state: BatchState) -> None:
        c = self.c
        first = state.requests[0]
        timesteps, sigmas = plan_schedule(c.scheduler, first.num_inference_steps, first.flow_shift)
        sampler: UniPCFlowState | FlowMatchEulerState = c.scheduler.start(timesteps, sigmas)
        # Both samplers compare the step's timestep (int64 for UniPC, float32 for Euler) with this float.
        boundary = None if c.boundary_ratio is None else c.boundary_ratio * c.scheduler.config.num_train_timesteps
        dtype = c.transformer.patch_embedding.weight.dtype
        total = len(timesteps)
        latents = state["latents"]
        batched_cfg = use_batched_cfg(self.pipeline.options.cfg_batching, latents[0, 0].numel() // 4)
        timer = state.perf.step_timer()
        for i, t in enumerate(timesteps):
            high_noise = boundary is None or t >= boundary
            model = c.transformer if high_noise or c.transformer_2 is None else c.transformer_2
            scale = state["guidance_scale" if high_noise else "guidance_scale_2"]
            latents = state["latents"]
            timestep = self.timestep(t, latents, state)
            model_input = self.model_input(latents, state).to(dtype)
            rows = {
                "hidden_states": model_input,
                "timestep": timestep,
                "encoder_hidden_states_image": state.get("image_embeds"),
            }
            if not first.cfg_enabled:
                noise_pred = model(encoder_hidden_states=state["prompt_embeds"], **rows)
            else:
                noise_pred, uncond = guided_forward(
                    model,
                    rows=rows,
                    cond={"encoder_hidden_states": state["prompt_embeds"]},
                    uncond={"encoder_hidden_states": state["negative_prompt_embeds"]},
                    fixed={},
                    batched=batched_cfg,
                )
                noise_pred = uncond + scale.view(-1, 1, 1, 1, 1).to(uncond.dtype) * (noise_pred - uncond)
            state.set_rows("latents", sampler.step(noise_pred, latents))
            timer.step_done(i)
            kept = state.drop_requests(self.progress(i + 1, total))
            if kept is not None:
                sampler.select(kept)
            if not state.active:
                return

    @staticmethod
    def model_input(latents: torch.Tensor, state: BatchState) -> torch.Tensor:
        if "condition" not in state:
            return latents
        if "first_frame_mask" in state:  # TI2V-5B: the image's latent replaces the first frame
            mask = state["first_frame_mask"]
            return (1 - mask) * state["condition"] + mask * latents
        return torch.cat([latents, state["condition"]], dim=1)

    def timestep(self, t: torch.Tensor, latents: torch.Tensor, state: BatchState) -> torch.Tensor:
        batch = latents.shape[0]
        if not self.c.expand_timesteps:
            return t.expand(batch).to(latents.device)
        # TI2V-5B: one timestep per video token (2x2 spatial patches); 0 on a given first frame.
        if "first_frame_mask" in state:
            mask = state["first_frame_mask"][0][0]
        else:
            mask = torch.ones(latents.shape[2:], device=latents.device)
        per_token = (mask[:, ::2, ::2] * t).flatten()
        return per_token.unsqueeze(0).expand(batch, -1)


class DecodeVideos(WanStage):
    name = "decoding"
    inputs = ("latents",)
    outputs = ("videos",)

    def run(self, state: BatchState) -> None:
        vae = self.c.vae
        z = vae.config.z_dim
        latents = state["latents"]
        if "first_frame_mask" in state:
            mask = state["first_frame_mask"]
            latents = (1 - mask) * state["condition"] + mask * latents
        latents = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        # One video at a time: bounded memory, and each output independent of its batch.
        if self.c.decoder is None:  # --vae-tiling
            videos = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
        else:
            slicing = self.pipeline.options.vae_slicing
            chunk = decode_chunk(latents.shape, z, latents.dtype, latents.device, slicing)
            videos = [self.c.decoder.decode(row.unsqueeze(0), temporal_chunk=chunk) for row in latents]
        pixels = (torch.cat(videos) * 0.5 + 0.5).clamp(0, 1)  # (B, C, T, H, W)
        state["videos"] = pixels.permute(0, 2, 3, 4, 1).float().cpu().numpy()


#: Whole-clip decoding keeps every layer's activations for all frames at once: it peaked at 24.4 GB
#: in bf16 for Wan2.1 at 832x480x81 on an H100 (0.88 s; perf_wan-vae_h100.md), about this many bytes
#: per output pixel (twice that in fp32). Larger clips, the 48-channel Wan2.2 VAE (whose widest layers
#: are 5x wider) or a GPU without room for it decode a few latent frames at a time instead, with the
#: causal context carried over.
WHOLE_CLIP_MAX_PIXELS = 832 * 480 * 81
WHOLE_CLIP_BYTES_PER_PIXEL = 760
DECODE_CHUNK_FRAMES = 8
#: `--vae-slicing`: the smallest-memory decode, 4 latent frames per call (8.4 GB peak at 832x480x81,
#: 0.92 s against 0.88 s for the whole clip on the H100).
SLICED_CHUNK_FRAMES = 4
#: Share of the GPU's free memory the whole-clip decode may plan to use (fragmentation, the output).
FREE_MEMORY_SHARE = 0.8


def decode_chunk(
    latent_shape: torch.Size, z_dim: int, dtype: torch.dtype, device: torch.device, slicing: bool
) -> int | None:
    """Latent frames per decode call: None (the whole clip at once) when it fits the budget above."""
    if slicing:
        return SLICED_CHUNK_FRAMES
    _, _, frames, height, width = latent_shape
    pixels = (4 * (frames - 1) + 1) * height * width * 64  # 8x8 pixels per latent position
    if z_dim != 16 or pixels > WHOLE_CLIP_MAX_PIXELS:
        return DECODE_CHUNK_FRAMES
    needed = pixels * WHOLE_CLIP_BYTES_PER_PIXEL * (2 if dtype == torch.float32 else 1)
    return None if needed <= available_memory(device) * FREE_MEMORY_SHARE else DECODE_CHUNK_FRAMES


def available_memory(device: torch.device) -> float:
    """Bytes a new allocation can get: free on the GPU plus what torch's cache holds unused (inf on CPU)."""
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
