"""HunyuanVideo text-to-video (hunyuanvideo-community/HunyuanVideo, FastVideo/FastHunyuan-diffusers): its family
adapter and pipeline.

Matches diffusers' `HunyuanVideoPipeline` on the same weights and seed: Llama hidden states of the templated
prompt and CLIP's pooled embedding (`models/hunyuan_video/text_encoder.py`), float32 noise drawn per request from
a CPU generator in the (B, C, F, H, W) latent layout, flow-match Euler over `linspace(1, 0)` sigmas with the
static shift (the checkpoint's, or the request's `flow_shift`), the guidance scale fed to the DiT's guidance
embedding (HunyuanVideo is guidance-distilled), and true CFG against a negative prompt when `true_cfg_scale > 1`.
The VAE is diffusers' `AutoencoderKLHunyuanVideo`.

Prompts keep only their real tokens: the reference pads each to `max_sequence_length` with an attention mask,
which excludes the padding from everything the video sees; rows of equal length run together without any mask
(`text_lengths.py`), so every output equals its request run alone and attention keeps its fastest kernels.

FastHunyuan is the same architecture, consistency-distilled to sample in 6 steps with shift 17 (FastVideo's
`FastHunyuanConfig`, the model card): its id brings those defaults, and the pipeline is this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.hunyuan_video import HunyuanVideoTransformer3DModel
from ..models.hunyuan_video.text_encoder import TEMPLATE_CROP, encode_prompt, load_llama_tokenizer
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState
from .conditioning import ModelInputs, RowInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import Denoiser
from .latents import draw_noise, video_latent_grid
from .sliding_tile_steps import SlidingTileSteps
from .spec import PipelineLimits, PipelineSpec, SamplingDefaults, tokenizer_limit
from .text_lengths import TEXT_LENGTHS, ByTextLength, each_text_once, pad_text_rows

#: The Llama text length HunyuanVideo was trained with (diffusers' and FastVideo's default `max_sequence_length`).
TEXT_MAX_LENGTH = 256
#: The longest clip the model was trained for (4k+1 frames; its default) and the largest frame (1080p-class):
#: RoPE is computed from positions, so only memory bounds them. 720p x 129 frames is 118 800 video tokens.
MAX_FRAMES = 129
MAX_PIXELS = 1920 * 1088
MAX_SIDE = 2048
#: HunyuanVideo's frame rate (the original repository's and FastVideo's; diffusers' `__call__` has none).
FPS = 24
#: The guidance scale is multiplied by this before the DiT's guidance embedding (the reference's convention).
GUIDANCE_EMBED_SCALE = 1000.0

#: hunyuanvideo-community/HunyuanVideo: diffusers' `__call__` defaults, which are the model's own (720p, 129
#: frames, 50 steps, embedded guidance 6), with the checkpoint's shift 7.
HUNYUAN_VIDEO_DEFAULTS = SamplingDefaults(
    width=1280,
    height=720,
    num_frames=129,
    fps=FPS,
    num_inference_steps=50,
    guidance_scale=6.0,
    max_sequence_length=TEXT_MAX_LENGTH,
    flow_shift=7.0,
)
#: FastVideo/FastHunyuan-diffusers: the model card's settings (720x1280x125, 6 steps, shift 17; embedded guidance
#: 6 without CFG, as FastVideo's FastHunyuanConfig and its inference scripts run it).
FAST_HUNYUAN_DEFAULTS = dataclasses.replace(
    HUNYUAN_VIDEO_DEFAULTS, num_frames=125, num_inference_steps=6, flow_shift=17.0
)


@dataclasses.dataclass
class HunyuanVideoComponents:
    tokenizer: Any
    text_encoder: LlamaModel
    clip_tokenizer: Any
    clip: CLIPTextModel
    transformer: HunyuanVideoTransformer3DModel
    vae: AutoencoderKLHunyuanVideo
    scheduler: FlowMatchEulerScheduler
    scale_spatial: int
    scale_temporal: int


class HunyuanVideoAdapter(FamilyAdapter):
    """HunyuanVideo under the engine's stages: each prompt's real Llama tokens plus CLIP's pooled embedding,
    float32 video latents, the embedded guidance scale, true CFG scaled by `true_cfg_scale`."""

    def __init__(self, components: HunyuanVideoComponents, options: RuntimeOptions) -> None:
        self.c = components
        self.dtype = components.transformer.proj_out.weight.dtype
        self.by_text_length = ByTextLength(components.transformer)
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
        c = self.c
        encoded = each_text_once(
            texts,
            lambda text: encode_prompt(
                c.text_encoder, c.tokenizer, c.clip, c.clip_tokenizer, text, max_sequence_length, device
            ),
        )
        tokens, lengths = pad_text_rows([row.tokens.to(self.dtype) for row in encoded])
        pooled = torch.stack([row.pooled for row in encoded]).to(self.dtype)
        return {"encoder_hidden_states": tokens, TEXT_LENGTHS: lengths, "pooled_projections": pooled}

    def guidance_inputs(self, rows: Sequence[Request], device: torch.device) -> RowInputs:
        if not self.c.transformer.config.guidance_embeds:
            return {"guidance": None}
        # Rounded to the transformer's dtype before the multiplication, as the reference builds it.
        scales = torch.tensor([r.guidance_scale for r in rows], dtype=self.dtype, device=device)
        return {"guidance": scales * GUIDANCE_EMBED_SCALE}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # True CFG: the scale in the transformer's dtype, as the reference multiplies its prediction by the float.
        return (torch.tensor([r.true_cfg_scale for r in rows], dtype=self.dtype, device=device),)

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        shape = (self.c.transformer.config.in_channels, *self.latent_grid(state.requests[0]))
        return draw_noise(state.requests, shape).to(state.device)  # float32, as the reference draws them

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

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        # The timestep in the latents' dtype: float32 at first, the prediction's dtype after a step (the Euler
        # step returns it), as the reference casts it.
        rows = {
            "hidden_states": latents.to(self.dtype),
            "timestep": timestep.expand(latents.shape[0]).to(latents.dtype),
        }
        return ModelInputs(rows=rows, fixed=self.sliding_tile.fixed_inputs() if self.sliding_tile else {})

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        latents = state["latents"].to(vae.dtype) / vae.config.scaling_factor
        # One video at a time: bounded memory, and each output independent of its batch.
        videos = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
        pixels = (torch.cat(videos) * 0.5 + 0.5).clamp(0, 1)  # (B, C, T, H, W)
        return pixels.permute(0, 2, 3, 4, 1).float().cpu().numpy()


def hunyuan_video_limits(components: HunyuanVideoComponents) -> PipelineLimits:
    config = components.transformer.config
    token = components.scale_spatial * config.patch_size  # 16: the reference requires multiples of it
    return PipelineLimits(
        size_multiple=token,
        min_size=token,
        max_side=MAX_SIDE,
        max_pixels=MAX_PIXELS,
        max_frames=MAX_FRAMES,
        frame_rule="four_k_plus_one",
        # The tokenizer bounds the templated prompt: the template's prefix comes on top of the prompt.
        max_sequence_length=tokenizer_limit(components.tokenizer, TEXT_MAX_LENGTH + TEMPLATE_CROP) - TEMPLATE_CROP,
        max_steps=components.scheduler.config.num_train_timesteps,
        token_size=token,
        frames_per_latent=components.scale_temporal * config.patch_size_t,
    )


class HunyuanVideoPipeline(FamilyPipeline):
    pipeline_class = "HunyuanVideoPipeline"

    def __init__(self, components: HunyuanVideoComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="hunyuan_video",
            task="text-to-video",
            guidance_mode="embedded_with_true_cfg",
            limits=hunyuan_video_limits(components),
            defaults=defaults,
            output="video",
            supports_flow_shift=True,
        )
        super().__init__(spec, HunyuanVideoAdapter(components, options), options)
        self.c = components
        if self.adapter.sliding_tile is not None:
            self.hooks.add(self.adapter.sliding_tile.index)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> HunyuanVideoPipeline:
        def build_transformer(config: dict) -> HunyuanVideoTransformer3DModel:
            return HunyuanVideoTransformer3DModel.from_config(
                config, attention_backend=options.attention_backend, video_sparse=options.video_sparse
            )

        scheduler = FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler"))
        if scheduler.config.use_dynamic_shifting:
            # HunyuanVideoPipeline passes no mu to set_timesteps, which the reference rejects for dynamic shifting.
            raise ValueError(f"{model_dir}: HunyuanVideo with a dynamically shifted scheduler is not supported")
        vae = load_pipeline_vae(AutoencoderKLHunyuanVideo, model_dir, options)
        llama_dtype, clip_dtype = options.text_encoder_dtypes_for(("text_encoder (Llama)", "text_encoder_2 (CLIP)"))
        components = HunyuanVideoComponents(
            tokenizer=load_llama_tokenizer(model_dir / "tokenizer"),
            text_encoder=load_transformers_model(LlamaModel, model_dir / "text_encoder", options.device, llama_dtype),
            clip_tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer_2")),
            clip=load_transformers_model(CLIPTextModel, model_dir / "text_encoder_2", options.device, clip_dtype),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=scheduler,
            scale_spatial=vae.config.spatial_compression_ratio,
            scale_temporal=vae.config.temporal_compression_ratio,
        )
        if defaults is None:
            defaults = diffusers_defaults(components)
        return cls(components, options, defaults)


def diffusers_defaults(components: HunyuanVideoComponents) -> SamplingDefaults:
    """HunyuanVideoPipeline.__call__'s defaults (with HunyuanVideo's frame rate), for folders that are no known
    checkpoint; the shift is the folder's scheduler's."""
    return dataclasses.replace(HUNYUAN_VIDEO_DEFAULTS, flow_shift=components.scheduler.config.shift)
