"""FLUX.1 text-to-image (black-forest-labs/FLUX.1-dev, FLUX.1-schnell): its family adapter and pipeline.

Matches diffusers' `FluxPipeline` on the same weights and seed: CLIP pooled + T5 text embeddings,
noise drawn per request from a CPU generator in the packed latent layout, flow-match Euler with the
resolution-dependent shift, guidance embedding, and true CFG when a negative prompt is given with
`true_cfg_scale > 1`. The VAE is diffusers' `AutoencoderKL` until a native one replaces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.flux import FluxTransformer2DModel
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState
from .conditioning import ModelInputs, RowInputs
from .family import FamilyAdapter, FamilyPipeline
from .latents import decode_images, draw_noise, latent_image_ids, pack_latents, unpack_latents
from .spec import PipelineSpec, SamplingDefaults, image_limits, tokenizer_limit

#: FLUX.1's CLIP tokenizer length; T5 takes `max_sequence_length` (at most 512).
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
#: Largest image we accept (4 MP); FLUX.1 is trained up to about 2 MP.
MAX_PIXELS = 2048 * 2048


@dataclasses.dataclass
class FluxComponents:
    clip_tokenizer: object
    clip: CLIPTextModel
    t5_tokenizer: object
    t5: T5EncoderModel
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerScheduler
    vae_scale_factor: int


class FluxAdapter(FamilyAdapter):
    """FLUX.1 under the engine's stages: CLIP pooled + T5 text inputs, 2x2-packed latents with position
    ids, the guidance scale as an input of the distilled model, true CFG scaled by `true_cfg_scale`."""

    def __init__(self, components: FluxComponents) -> None:
        self.c = components
        self.dtype = components.transformer.x_embedder.weight.dtype

    def latent_size(self, request: Request) -> tuple[int, int]:
        """Latent height and width: 8x VAE compression, and even for the 2x2 packing."""
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
        pooled, embeds = self.encode_texts(texts, max_sequence_length, device)
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def encode_texts(self, texts: list[str], seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP pooled embeddings and T5 sequence embeddings of `texts`, in the encoders' dtypes."""
        clip_ids = self.c.clip_tokenizer(
            texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = self.c.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.c.t5_tokenizer(
            texts, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = self.c.t5(t5_ids.to(device), output_hidden_states=False)[0]
        return pooled, embeds

    def guidance_inputs(self, rows: Sequence[Request], device: torch.device) -> RowInputs:
        # Guidance goes to the embedding as float32, as diffusers passes it; schnell has no such input.
        guidance = torch.tensor([r.guidance_scale for r in rows], dtype=torch.float32, device=device)
        return {"guidance": guidance if self.c.transformer.config.guidance_embeds else None}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # True CFG: the scale in the transformer's dtype, as diffusers multiplies by the Python float.
        return (torch.tensor([r.true_cfg_scale for r in rows], dtype=self.dtype, device=device),)

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        channels = self.c.transformer.config.in_channels // 4
        height, width = self.latent_size(state.requests[0])
        # Drawn in the transformer's dtype and the unpacked layout, as diffusers draws them.
        latents = pack_latents(draw_noise(state.requests, (channels, height, width), self.dtype).to(state.device))
        state["latent_image_ids"] = latent_image_ids(height // 2, width // 2, state.device, self.dtype)
        state["text_ids"] = torch.zeros(state.requests[0].max_sequence_length, 3, device=state.device, dtype=self.dtype)
        return latents

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        image_seq_len = state["latents"].shape[1]
        steps = state.requests[0].num_inference_steps
        timesteps, sigmas = self.c.scheduler.plan(steps, image_seq_len, device=state.device)
        return self.c.scheduler.start(timesteps, sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        # diffusers casts t to the latent dtype before dividing; keep that rounding.
        rows = {"hidden_states": latents, "timestep": timestep.expand(latents.shape[0]).to(latents.dtype) / 1000}
        return ModelInputs(rows=rows, fixed={"img_ids": state["latent_image_ids"], "txt_ids": state["text_ids"]})

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        latents = unpack_latents(state["latents"], *self.latent_size(state.requests[0]))
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return decode_images(vae, latents.to(vae.dtype))


class FluxPipeline(FamilyPipeline):
    pipeline_class = "FluxPipeline"

    def __init__(self, components: FluxComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        token = components.vae_scale_factor * 2  # 8x VAE, then 2x2 latent packing
        limits = image_limits(
            token=token,
            # FLUX computes RoPE from position ids (no table), so only the pixel bound limits a side.
            max_side=MAX_PIXELS // token,
            max_pixels=MAX_PIXELS,
            max_sequence_length=tokenizer_limit(components.t5_tokenizer, T5_MAX_LENGTH),
            max_steps=components.scheduler.config.num_train_timesteps,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="flux1",
            task="text-to-image",
            guidance_mode="embedded_with_true_cfg",
            limits=limits,
            defaults=defaults,
        )
        super().__init__(spec, FluxAdapter(components), options)
        self.c = components

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> FluxPipeline:
        def build_transformer(config: dict) -> FluxTransformer2DModel:
            return FluxTransformer2DModel.from_config(config, attention_backend=options.attention_backend)

        vae = load_pipeline_vae(AutoencoderKL, model_dir, options)
        # Text encoders run in the DiT's precision (bf16 on GPU, as the reference checkpoints ship) unless
        # --text-encoder-precisions says otherwise.
        clip_dtype, t5_dtype = options.text_encoder_dtypes_for(("text_encoder (CLIP)", "text_encoder_2 (T5)"))
        components = FluxComponents(
            clip_tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
            clip=load_transformers_model(CLIPTextModel, model_dir / "text_encoder", options.device, clip_dtype),
            t5_tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer_2")),
            t5=load_transformers_model(T5EncoderModel, model_dir / "text_encoder_2", options.device, t5_dtype),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
        if defaults is None:
            defaults = diffusers_defaults(components)
        return cls(components, options, defaults)


def diffusers_defaults(components: FluxComponents) -> SamplingDefaults:
    """FluxPipeline.__call__'s own defaults, for folders that are no known checkpoint."""
    size = 128 * components.vae_scale_factor  # diffusers' default_sample_size x VAE factor
    guided = components.transformer.config.guidance_embeds
    return SamplingDefaults(
        width=size,
        height=size,
        num_inference_steps=28,
        guidance_scale=3.5 if guided else 0.0,
        max_sequence_length=T5_MAX_LENGTH,
    )
