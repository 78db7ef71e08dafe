"""Z-Image text-to-image (Tongyi-MAI/Z-Image-Turbo): its family adapter and pipeline.

Matches diffusers' `ZImagePipeline` on the same weights and seed: Qwen3 hidden states (second-to-last layer)
of each prompt's real tokens as caption features (`models/z_image/text_encoder.py`), float32 noise drawn per
request from a CPU generator in the `(B, 16, H/8, W/8)` latent layout, flow-match Euler over diffusers'
Z-Image sigmas (`linspace(1, 1/N, N)`, shifted by the scheduler's config: a static 3 for the published
checkpoint), and the model's output negated into the velocity, in float32. The VAE is diffusers'
`AutoencoderKL` (FLUX.1's), decoded with its scaling and shift factors.

Guidance follows the reference's own rule (`guidance.ConditionalOffsetCFG`): on for `guidance_scale > 0`,
`cond + scale * (cond - uncond)`, optionally capped in norm (`cfg_normalization`) and switched off for the
late steps (`cfg_truncation`). Z-Image-Turbo runs without it (`guidance_scale` 0).

Prompts keep only their real tokens, so prompts (and a prompt and its negative prompt) differ in length. The
DiT pads each caption itself to a multiple of 32 with a learned token, so rows whose captions pad alike run
together, each group without a mask (`text_lengths.py`): every output equals its request run alone (up to
the last bits of differently sized matrix products), and diffusers' whenever its batch needs no mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, Qwen3Model

from ..errors import invalid_request
from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.z_image import ZImageTransformer2DModel, encode_prompts
from ..models.z_image.transformer import SEQ_MULTIPLE, padded_length
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState
from .conditioning import ModelInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import ConditionalOffsetCFG, Guider, NoGuidance
from .latents import decode_images, draw_noise
from .spec import PipelineSpec, SamplingDefaults, image_limits, tokenizer_limit
from .text_lengths import TEXT_LENGTHS, ByTextLength, each_text_once, pad_text_rows

#: Largest image we accept (4 MP); Z-Image-Turbo's published sizes stay near 1 MP (up to 2048 px a side).
MAX_PIXELS = 2048 * 2048
#: Longest side: a 4:1 strip at the pixel bound (the RoPE table may bound it further, see `max_side`).
MAX_SIDE = 4096
#: The pipeline's timestep normalisation: the DiT reads `(1000 - t) / 1000` (a literal, not the scheduler's
#: num_train_timesteps).
TIMESTEP_SCALE = 1000
#: ZImagePipeline.__call__'s defaults, for folders that are no known checkpoint: 1024x1024, 50 steps, CFG 5
#: against the empty negative prompt.
DIFFUSERS_SIZE = 1024
DIFFUSERS_STEPS = 50
DIFFUSERS_GUIDANCE_SCALE = 5.0
DIFFUSERS_MAX_SEQUENCE_LENGTH = 512

#: Tongyi-MAI/Z-Image-Turbo's model card: 1024x1024, 9 steps ("8 DiT forwards" with the last sigma 0), no CFG.
Z_IMAGE_TURBO_DEFAULTS = SamplingDefaults(
    width=1024,
    height=1024,
    num_inference_steps=9,
    guidance_scale=0.0,
    max_sequence_length=DIFFUSERS_MAX_SEQUENCE_LENGTH,
)


@dataclasses.dataclass
class ZImageComponents:
    tokenizer: Any
    text_encoder: Qwen3Model
    transformer: ZImageTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerScheduler
    vae_scale_factor: int


def default_sigmas(steps: int) -> list[float]:
    """ZImagePipeline's unshifted sigmas: `linspace(1, 1/N, N)` in torch float32 (not numpy's float64, whose
    values can round to other float32s)."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


class ZImageAdapter(FamilyAdapter):
    """Z-Image under the engine's stages: Qwen3 caption rows of each prompt's own length, `(B, C, H, W)`
    float32 latents, the normalised timestep, guidance counted from the conditional prediction."""

    def __init__(self, components: ZImageComponents) -> None:
        self.c = components
        self.dtype = components.transformer.cap_embedder[1].weight.dtype
        # Rows whose captions the model pads to the same multiple of 32 run together, as in the reference.
        self.by_text_length = ByTextLength(self._prediction, bucket=padded_length, lengths_key="caption_lengths")

    def check_requests(self, requests: Sequence[Request]) -> None:
        # The core fills both for this family's guidance mode (0: no cap, 1: every step guided); a request
        # built around the core without them would fail deep in the loop instead.
        for request in requests:
            for field in ("cfg_normalization", "cfg_truncation"):
                if getattr(request, field) is None:
                    raise invalid_request(field, "must be a number for Z-Image (0 and 1 leave guidance as it is)")

    def latent_size(self, request: Request) -> tuple[int, int]:
        """Latent height and width: 8x VAE compression, and even for the 2x2 patches."""
        factor = self.c.vae_scale_factor * 2
        return 2 * (request.height // factor), 2 * (request.width // factor)

    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        del owners  # the texts alone decide the encoding

        # Each distinct text alone, as diffusers encodes a request's prompt and its negative prompt ("", shared).
        def encode(text: str) -> torch.Tensor:
            (row,) = encode_prompts(
                self.c.text_encoder,
                self.c.tokenizer,
                [text],
                max_sequence_length=max_sequence_length,
                device=device,
                dtype=self.dtype,
            )
            return row

        embeds, lengths = pad_text_rows(each_text_once(texts, encode))
        return {"encoder_hidden_states": embeds, TEXT_LENGTHS: lengths}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # float32: the reference combines the float32 predictions with the Python float.
        return (torch.tensor([r.guidance_scale for r in rows], dtype=torch.float32, device=device),)

    def guider(self, cfg: bool, batched: bool) -> Guider:
        return ConditionalOffsetCFG(batched) if cfg else NoGuidance()

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        channels = self.c.transformer.config.in_channels
        height, width = self.latent_size(state.requests[0])
        # diffusers draws (B, C, H, W) in float32 whatever the model's dtype, and keeps the latents float32.
        return draw_noise(state.requests, (channels, height, width), torch.float32).to(state.device)

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        steps = state.requests[0].num_inference_steps
        height, width = state["latents"].shape[-2:]
        # Timesteps stay on the CPU: each step's normalised time is then known without waiting for the GPU
        # (the DiT gets it as a device tensor filled from the value, CFG truncation compares it).
        timesteps, sigmas = self.c.scheduler.plan(steps, (height // 2) * (width // 2), sigmas=default_sigmas(steps))
        return self.c.scheduler.start(timesteps, sigmas.to(state.device))

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def denoiser(self, expert: int) -> ByTextLength:
        del expert  # one expert
        return self.by_text_length

    def _prediction(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        caption_lengths: tuple[int, ...],
        **features: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity the sampler steps with: the model's output negated, in float32 (the reference negates
        after guidance; negation is exact, so doing it first gives the same bits). `features`: row inputs loop
        features add for the model (per-request LoRA's rows), passed through."""
        out = self.c.transformer(
            hidden_states=hidden_states.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            caption_lengths=caption_lengths,
            **features,
        )
        return -out.float()

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        # (1000 - t) / 1000 in float32 on the CPU timestep: the reference's value, and its truncation test.
        normalized = float((TIMESTEP_SCALE - timestep) / TIMESTEP_SCALE)
        rows = {
            "hidden_states": latents,
            "timestep": torch.full((latents.shape[0],), normalized, dtype=torch.float32, device=latents.device),
        }
        guidance: dict[str, torch.Tensor] = {}
        if state["conditioning"].negative is not None:
            requests = [state.requests[owner] for owner in state.row_owner.tolist()]
            # Guidance ends for the steps whose normalised time is past the row's cfg_truncation.
            guidance["active"] = torch.tensor([not normalized > r.cfg_truncation for r in requests])
            guidance["normalization"] = torch.tensor([r.cfg_normalization for r in requests], dtype=torch.float64)
        return ModelInputs(rows=rows, guidance=guidance)

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        # In the VAE's dtype first, then its scale and shift, as the reference orders them.
        latents = state["latents"].to(vae.dtype)
        return decode_images(vae, latents / vae.config.scaling_factor + vae.config.shift_factor)


class ZImagePipeline(FamilyPipeline):
    pipeline_class = "ZImagePipeline"

    def __init__(self, components: ZImageComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        token = components.vae_scale_factor * 2  # 8x VAE, then 2x2 patches
        config = components.transformer.config
        # RoPE tables bound the image's token grid and, through the caption's padded length, the prompt.
        _, rows_in_table, columns_in_table = config.axes_lens
        longest_caption = (config.axes_lens[0] - 2) // SEQ_MULTIPLE * SEQ_MULTIPLE
        limits = image_limits(
            token=token,
            max_side=min(MAX_SIDE, token * min(rows_in_table, columns_in_table)),
            max_pixels=MAX_PIXELS,
            max_sequence_length=tokenizer_limit(components.tokenizer, longest_caption),
            max_steps=components.scheduler.config.num_train_timesteps,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="z_image",
            task="text-to-image",
            guidance_mode="classifier_free_above_zero",
            limits=limits,
            defaults=defaults,
        )
        super().__init__(spec, ZImageAdapter(components), options)
        self.c = components

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> ZImagePipeline:
        def build_transformer(config: dict) -> ZImageTransformer2DModel:
            return ZImageTransformer2DModel.from_config(config, attention_backend=options.attention_backend)

        vae = load_pipeline_vae(AutoencoderKL, model_dir, options)
        (text_encoder_dtype,) = options.text_encoder_dtypes_for(("text_encoder (Qwen3)",))
        components = ZImageComponents(
            tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
            text_encoder=load_transformers_model(
                Qwen3Model, model_dir / "text_encoder", options.device, text_encoder_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            # diffusers: 2 ** (len(block_out_channels) - 1), 8 for the FLUX VAE.
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
        return cls(components, options, diffusers_defaults() if defaults is None else defaults)


def diffusers_defaults() -> SamplingDefaults:
    """ZImagePipeline.__call__'s own defaults, for folders that are no known checkpoint: 1024x1024, 50 steps,
    CFG 5 against the empty negative prompt."""
    return SamplingDefaults(
        width=DIFFUSERS_SIZE,
        height=DIFFUSERS_SIZE,
        num_inference_steps=DIFFUSERS_STEPS,
        guidance_scale=DIFFUSERS_GUIDANCE_SCALE,
        max_sequence_length=DIFFUSERS_MAX_SEQUENCE_LENGTH,
    )
