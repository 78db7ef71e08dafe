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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.wan import WanTransformer3DModel
from ..models.wan.vae import WanVAEDecoder
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import UniPCFlowScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerScheduler
from .base import BatchState, per_row
from .conditioning import ModelInputs
from .family import FamilyAdapter, FamilyPipeline
from .images import load_image
from .latents import denormalize_latents, draw_noise, normalize_latents, video_latent_grid
from .loop import Sampler
from .sliding_tile_steps import SlidingTileSteps
from .spec import PipelineLimits, PipelineSpec, SamplingDefaults, tokenizer_limit

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


def wan_limits(components: WanComponents) -> PipelineLimits:
    config = components.transformer.config
    patch = config.patch_size
    multiple = components.scale_spatial * patch[1]  # 16 for Wan2.1, 32 for TI2V-5B
    # The DiT's RoPE table has rope_max_seq_len positions per axis of the latent grid (the reference
    # fails beyond it): the longest side and clip this checkpoint can run at all.
    max_side = config.rope_max_seq_len * components.scale_spatial * min(patch[1], patch[2])
    rope_frames = (config.rope_max_seq_len * patch[0] - 1) * components.scale_temporal + 1
    return PipelineLimits(
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


class WanPipeline(FamilyPipeline):
    pipeline_class = "WanPipeline"

    def __init__(self, components: WanComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        super().__init__(self.describe(components, defaults), self.make_adapter(components, options), options)
        self.c = components
        if self.adapter.sliding_tile is not None:
            self.hooks.add(self.adapter.sliding_tile.index)

    @classmethod
    def describe(cls, components: WanComponents, defaults: SamplingDefaults) -> PipelineSpec:
        """The spec of this class of pipeline over `components`."""
        # TI2V-5B (expand_timesteps): one folder serves text-to-video and image-to-video.
        text_image = components.expand_timesteps
        return PipelineSpec(
            pipeline_class=cls.pipeline_class,
            family="wan",
            task="text-image-to-video" if text_image else "text-to-video",
            guidance_mode="classifier_free",
            limits=wan_limits(components),
            defaults=defaults,
            output="video",
            image_input="optional" if text_image else "none",
            supports_flow_shift=True,
            supports_guidance_scale_2=components.transformer_2 is not None,
        )

    @classmethod
    def make_adapter(cls, components: WanComponents, options: RuntimeOptions) -> WanAdapter:
        return WanAdapter(components, options)

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
            return WanTransformer3DModel.from_config(
                config, attention_backend=options.attention_backend, video_sparse=options.video_sparse
            )

        def present(component: str) -> bool:
            return (index.get(component) or [None])[0] is not None

        has_second_expert = present("transformer_2")
        vae = load_pipeline_vae(AutoencoderKLWan, model_dir, options)
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


class WanImageToVideoPipeline(WanPipeline):
    """The same stages; the checkpoint's class says every request brings an image."""

    pipeline_class = "WanImageToVideoPipeline"

    @classmethod
    def describe(cls, components: WanComponents, defaults: SamplingDefaults) -> PipelineSpec:
        return dataclasses.replace(
            super().describe(components, defaults),
            task="image-to-video",
            image_input="required",
            last_image_input=last_frame_input(components),
        )


def last_frame_input(components: WanComponents) -> str:
    """Whether an image-to-video checkpoint takes a last frame. FLF2V checkpoints (a learned position
    embedding over two CLIP images, `pos_embed_seq_len`) need one; one without CLIP image tokens (Wan2.2
    I2V-A14B) reads it only through the frame mask and the VAE condition, so it may; a CLIP one without that
    embedding cannot take two images' tokens, and TI2V-5B conditions on the first latent frame alone."""
    if components.expand_timesteps:
        return "none"
    config = components.transformer.config
    if config.image_dim is None:
        return "optional"
    return "required" if config.pos_embed_seq_len is not None else "none"


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


class WanAdapter(FamilyAdapter):
    """Wan under the engine's stages: UMT5 text inputs, float32 latents of the VAE's channels, UniPC or
    flow-match Euler, the A14B expert switch, the image condition (I2V) and per-token timesteps (TI2V-5B)."""

    def __init__(self, components: WanComponents, options: RuntimeOptions) -> None:
        c = components
        self.c = c
        self.dtype = c.transformer.patch_embedding.weight.dtype
        self.vae_slicing = options.vae_slicing
        self.video_processor = VideoProcessor(vae_scale_factor=c.scale_spatial)
        # The step's timestep (int64 for UniPC, float32 for Euler) is compared with this float. A folder
        # with a boundary but one expert runs that expert throughout.
        has_boundary = c.boundary_ratio is not None and c.transformer_2 is not None
        self.boundary = c.boundary_ratio * c.scheduler.config.num_train_timesteps if has_boundary else None
        # Sliding tile attention's windows change per denoising step: the loop's step index goes to the DiT.
        self.sliding_tile = SlidingTileSteps.from_options(options)

    def check_requests(self, requests: Sequence[Request]) -> None:
        """Rejects requests that run more denoising steps than sliding tile attention's mask strategy covers."""
        if self.sliding_tile is not None:
            self.sliding_tile.check_requests(requests)

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
        return {"encoder_hidden_states": self.encode_texts(texts, max_sequence_length, device).to(self.dtype)}

    def encode_texts(self, texts: list[str], seq_len: int, device: torch.device) -> torch.Tensor:
        """UMT5 embeddings of the cleaned texts, each trimmed to its tokens and zero-padded, as the DiT was trained."""
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
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
        return hidden * keep[..., None].to(hidden.dtype)

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # float32, cast to the prediction's dtype when applied (as diffusers multiplies by a Python float).
        scales = [[r.guidance_scale for r in rows]]
        if self.c.transformer_2 is not None:
            # 0 is a scale like any other (the unconditional prediction alone): only None falls back.
            scales.append([r.guidance_scale if r.guidance_scale_2 is None else r.guidance_scale_2 for r in rows])
        return tuple(torch.tensor(values, dtype=torch.float32, device=device) for values in scales)

    def encode_images(self, state: BatchState) -> None:
        """The VAE latent of each request's first frame (with the frame mask for Wan2.1 I2V / A14B I2V, or
        pasted over the first latent frame for TI2V-5B) and, where the DiT takes them, CLIP image tokens.
        One request at a time, as diffusers encodes a batch of one."""
        c = self.c
        requests = state.requests
        first = requests[0]
        conditions, tokens = [], []
        for request in requests:
            image = load_image(request.image_path)  # type: ignore[arg-type]  # the stage checked it is set
            # First-last-frame: the last frame too (the core checked that the checkpoint takes it).
            last = load_image(request.last_image_path) if request.last_image_path is not None else None
            if c.image_encoder is not None and c.transformer.config.image_dim is not None:
                # Both frames' tokens side by side; the DiT's image embedder joins them into one row.
                tokens.append(self.clip_tokens([image] if last is None else [image, last], state.device))
            frames = [image] if last is None else [image, last]
            pixels = [
                self.video_processor.preprocess(frame, height=first.height, width=first.width) for frame in frames
            ]
            pixels = [frame.to(state.device, torch.float32) for frame in pixels]
            conditions.append(self.latent_condition(pixels, request, state.device))
        state.set_rows("condition", per_row(torch.cat(conditions), requests))
        if tokens:
            state.set_rows("image_embeds", per_row(torch.cat(tokens), requests).to(self.dtype))
        if c.expand_timesteps:
            mask = torch.ones(1, 1, *self.latent_grid(first), device=state.device)
            mask[:, :, 0] = 0
            state["first_frame_mask"] = mask

    def clip_tokens(self, images: list[Image.Image], device: torch.device) -> torch.Tensor:
        """CLIP's penultimate hidden states of `images` (one or two frames), as one row: (1, n * tokens, dim)."""
        c = self.c
        inputs = c.image_processor(images=images, return_tensors="pt").to(device)  # type: ignore[misc]
        hidden = c.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]  # type: ignore[misc]
        return hidden.reshape(1, -1, hidden.shape[-1])

    def latent_condition(self, pixels: list[torch.Tensor], request: Request, device: torch.device) -> torch.Tensor:
        """The VAE condition of the given frames (the first, and the last of first-last-frame), each (1, 3, H, W)."""
        c = self.c
        vae = c.vae
        image = pixels[0].unsqueeze(2)  # (1, 3, 1, H, W)
        if c.expand_timesteps:
            video = image
        else:
            # The given frames where they are, black frames between: the VAE sees a whole clip whose start
            # (and end) is fixed.
            given = [frame.unsqueeze(2) for frame in pixels]
            gap = image.new_zeros(1, 3, request.num_frames - len(given), *image.shape[-2:])
            video = torch.cat([given[0], gap, *given[1:]], dim=2)
        encoded = vae.encode(video.to(vae.dtype)).latent_dist.mode().to(device, torch.float32)
        encoded = normalize_latents(encoded, vae.config.latents_mean, vae.config.latents_std)
        if c.expand_timesteps:
            return encoded
        return torch.cat([self.frame_mask(request).to(encoded.device), encoded], dim=1)

    def frame_mask(self, request: Request) -> torch.Tensor:
        """Which pixel frames are given (the first, and the last of first-last-frame), folded to latent
        frames as the DiT expects: (1, scale_temporal, latent_frames, h, w)."""
        _, height, width = self.latent_grid(request)
        scale = self.c.scale_temporal
        mask = torch.zeros(1, 1, request.num_frames, height, width)
        mask[:, :, 0] = 1
        if request.last_image_path is not None:
            mask[:, :, -1] = 1
        first = mask[:, :, 0:1].repeat_interleave(scale, dim=2)
        mask = torch.cat([first, mask[:, :, 1:]], dim=2)
        return mask.view(1, -1, scale, height, width).transpose(1, 2)

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        # Noise has the VAE's channels; the DiT's extra input channels (I2V) are the image condition.
        # diffusers keeps Wan latents in float32 and casts to the DiT dtype per forward.
        shape = (self.c.vae.config.z_dim, *self.latent_grid(state.requests[0]))
        return draw_noise(state.requests, shape).to(state.device)

    def sampler(self, state: BatchState) -> Sampler:
        first = state.requests[0]
        timesteps, sigmas = plan_schedule(self.c.scheduler, first.num_inference_steps, first.flow_shift)
        return self.c.scheduler.start(timesteps, sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [model for model in (self.c.transformer, self.c.transformer_2) if model is not None]

    def expert_for(self, timestep: torch.Tensor) -> int:
        # Wan2.2 A14B: the high-noise expert from the first step down to the boundary, then the low-noise one.
        return 0 if self.boundary is None or bool(timestep >= self.boundary) else 1

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        rows = {
            "hidden_states": self.with_condition(latents, state).to(self.dtype),
            "timestep": self.timestep(timestep, latents, state),
            "encoder_hidden_states_image": state.get("image_embeds"),
        }
        return ModelInputs(rows=rows, fixed=self.sliding_tile.fixed_inputs() if self.sliding_tile else {})

    @staticmethod
    def with_condition(latents: torch.Tensor, state: BatchState) -> torch.Tensor:
        """The latents with the image condition: pasted over the first frame (TI2V-5B) or concatenated
        along the channels (Wan2.1 I2V, A14B I2V); the latents alone without an image."""
        if "condition" not in state:
            return latents
        if "first_frame_mask" in state:
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

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        z = vae.config.z_dim
        latents = state["latents"]
        if "first_frame_mask" in state:
            mask = state["first_frame_mask"]
            latents = (1 - mask) * state["condition"] + mask * latents
        latents = denormalize_latents(latents.to(vae.dtype), vae.config.latents_mean, vae.config.latents_std)
        # One video at a time: bounded memory, and each output independent of its batch.
        if self.c.decoder is None:  # --vae-tiling
            videos = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
        else:
            chunk = decode_chunk(latents.shape, z, latents.dtype, latents.device, self.vae_slicing)
            videos = [self.c.decoder.decode(row.unsqueeze(0), temporal_chunk=chunk) for row in latents]
        pixels = (torch.cat(videos) * 0.5 + 0.5).clamp(0, 1)  # (B, C, T, H, W)
        return pixels.permute(0, 2, 3, 4, 1).float().cpu().numpy()


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
