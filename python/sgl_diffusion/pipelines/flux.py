"""FLUX.1 text-to-image (black-forest-labs/FLUX.1-dev, FLUX.1-schnell) as a staged pipeline.

Matches diffusers' `FluxPipeline` on the same weights and seed: CLIP pooled + T5 text embeddings,
noise drawn per request from a CPU generator in the packed latent layout, flow-match Euler with the
resolution-dependent shift, guidance embedding, and true CFG when a negative prompt is given with
`true_cfg_scale > 1`. The VAE is diffusers' `AutoencoderKL` until a native one replaces it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from ..loading import load_diffusers_model, load_native_model, load_transformers_model, read_config
from ..models.flux import FluxTransformer2DModel
from ..runtime.options import RuntimeOptions
from ..schedulers import FlowMatchEulerScheduler, euler_step
from .base import BatchState, PipelineLimits, ProgressFn, SamplingDefaults, Stage, StagedPipeline, tokenizer_limit
from .common import draw_noise, guided_forward, per_row, shared_value, use_batched_cfg

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


class FluxPipeline(StagedPipeline):
    pipeline_class = "FluxPipeline"
    family = "flux1"
    task = "text-to-image"
    guidance_mode = "embedded_with_true_cfg"

    def __init__(self, components: FluxComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        token = components.vae_scale_factor * 2  # 8x VAE, then 2x2 latent packing
        limits = PipelineLimits(
            size_multiple=token,
            min_size=token,
            # FLUX computes RoPE from position ids (no table), so only the pixel bound limits a side.
            max_side=MAX_PIXELS // token,
            max_pixels=MAX_PIXELS,
            max_frames=1,
            frame_rule="single",
            max_sequence_length=tokenizer_limit(components.t5_tokenizer, T5_MAX_LENGTH),
            max_steps=components.scheduler.config.num_train_timesteps,
            token_size=token,
        )
        super().__init__(options, limits, defaults)
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

        vae = load_diffusers_model(AutoencoderKL, model_dir / "vae", options.device, options.vae_dtype)
        if options.vae_tiling:
            vae.enable_tiling()
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

    def denoisers(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def stages(self, progress: ProgressFn) -> list[Stage]:
        return [
            CheckShapes(self),
            EncodeText(self),
            PrepareLatents(self),
            PrepareTimesteps(self),
            Denoise(self, progress),
            DecodeImages(self),
        ]


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


class FluxStage(Stage):
    def __init__(self, pipeline: FluxPipeline) -> None:
        self.pipeline = pipeline
        self.c = pipeline.c


class CheckShapes(FluxStage):
    """Input validation: the core already checked each request; here the batch must share shapes."""

    name = "input_validation"
    outputs = ("height", "width", "latent_height", "latent_width")

    def run(self, state: BatchState) -> None:
        for field in ("width", "height", "num_inference_steps", "max_sequence_length", "cfg_enabled"):
            shared_value(state.requests, field)
        first = state.requests[0]
        factor = self.c.vae_scale_factor
        state["height"], state["width"] = first.height, first.width
        # 8x VAE compression, and an even latent size for the 2x2 packing.
        state["latent_height"] = 2 * (first.height // (factor * 2))
        state["latent_width"] = 2 * (first.width // (factor * 2))


class EncodeText(FluxStage):
    """CLIP pooled embedding + T5 sequence embedding per output row (and for the negative prompts)."""

    name = "text_encoding"
    outputs = ("prompt_embeds", "pooled_prompt_embeds", "text_ids", "guidance", "true_cfg_scale")

    def run(self, state: BatchState) -> None:
        dtype = self.c.transformer.x_embedder.weight.dtype
        requests = state.requests
        seq_len = requests[0].max_sequence_length
        cfg = requests[0].cfg_enabled
        texts = [r.prompt for r in requests] + ([r.negative_prompt or "" for r in requests] if cfg else [])
        pooled, embeds = self._encode(texts, seq_len, state.device)
        n = len(requests)
        state.set_rows("prompt_embeds", per_row(embeds[:n], requests).to(dtype))
        state.set_rows("pooled_prompt_embeds", per_row(pooled[:n], requests).to(dtype))
        if cfg:
            state.set_rows("negative_prompt_embeds", per_row(embeds[n:], requests).to(dtype))
            state.set_rows("negative_pooled_prompt_embeds", per_row(pooled[n:], requests).to(dtype))
        state["text_ids"] = torch.zeros(seq_len, 3, device=state.device, dtype=dtype)
        rows = state.row_owner.tolist()
        # Guidance goes to the embedding as float32, as diffusers passes it.
        state.set_rows(
            "guidance",
            torch.tensor([requests[i].guidance_scale for i in rows], dtype=torch.float32, device=state.device),
        )
        state.set_rows(
            "true_cfg_scale",
            torch.tensor([requests[i].true_cfg_scale for i in rows], dtype=dtype, device=state.device),
        )

    def _encode(self, texts: list[str], seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        clip_ids = self.c.clip_tokenizer(
            texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = self.c.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.c.t5_tokenizer(
            texts, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = self.c.t5(t5_ids.to(device), output_hidden_states=False)[0]
        return pooled, embeds


class PrepareLatents(FluxStage):
    """Initial noise, drawn per request from its own CPU generator so that a request's output does
    not depend on its batch, and equals diffusers' for the same seed."""

    name = "latent_preparation"
    inputs = ("latent_height", "latent_width")
    outputs = ("latents", "latent_image_ids")

    def run(self, state: BatchState) -> None:
        dtype = self.c.transformer.x_embedder.weight.dtype
        channels = self.c.transformer.config.in_channels // 4
        h, w = state["latent_height"], state["latent_width"]
        latents = pack_latents(draw_noise(state.requests, (channels, h, w), dtype).to(state.device))
        state.set_rows("latents", latents)
        state["latent_image_ids"] = latent_image_ids(h // 2, w // 2, state.device, dtype)


class PrepareTimesteps(FluxStage):
    name = "timestep_preparation"
    inputs = ("latents",)
    outputs = ("timesteps", "sigmas")

    def run(self, state: BatchState) -> None:
        image_seq_len = state["latents"].shape[1]
        steps = state.requests[0].num_inference_steps
        timesteps, sigmas = self.c.scheduler.plan(steps, image_seq_len, device=state.device)
        state["timesteps"], state["sigmas"] = timesteps, sigmas


class Denoise(FluxStage):
    name = "denoising"
    inputs = ("latents", "timesteps", "sigmas", "prompt_embeds", "pooled_prompt_embeds", "guidance")
    outputs = ("latents",)

    def __init__(self, pipeline: FluxPipeline, progress: ProgressFn) -> None:
        super().__init__(pipeline)
        self.progress = progress

    def run(self, state: BatchState) -> None:
        transformer = self.c.transformer
        guided = transformer.config.guidance_embeds
        cfg = state.requests[0].cfg_enabled
        timesteps, sigmas = state["timesteps"], state["sigmas"]
        total = len(timesteps)
        batched_cfg = use_batched_cfg(self.pipeline.options.cfg_batching, state["latents"].shape[1])
        timer = state.perf.step_timer()
        for i, t in enumerate(timesteps):
            latents = state["latents"]
            # diffusers casts t to the latent dtype before dividing; keep that rounding.
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            rows = {
                "hidden_states": latents,
                "timestep": timestep,
                "guidance": state["guidance"] if guided else None,
            }
            fixed = {"img_ids": state["latent_image_ids"], "txt_ids": state["text_ids"]}
            cond = {
                "encoder_hidden_states": state["prompt_embeds"],
                "pooled_projections": state["pooled_prompt_embeds"],
            }
            if not cfg:
                noise_pred = transformer(**rows, **cond, **fixed)
            else:
                uncond = {
                    "encoder_hidden_states": state["negative_prompt_embeds"],
                    "pooled_projections": state["negative_pooled_prompt_embeds"],
                }
                noise_pred, negative = guided_forward(
                    transformer, rows=rows, cond=cond, uncond=uncond, fixed=fixed, batched=batched_cfg
                )
                scale = state["true_cfg_scale"].view(-1, 1, 1)
                noise_pred = negative + scale * (noise_pred - negative)
            state.set_rows("latents", euler_step(latents, noise_pred, sigmas[i], sigmas[i + 1]))
            timer.step_done(i)
            state.drop_requests(self.progress(i + 1, total))
            if not state.active:
                return


class DecodeImages(FluxStage):
    name = "decoding"
    inputs = ("latents", "latent_height", "latent_width")
    outputs = ("images",)

    def run(self, state: BatchState) -> None:
        vae = self.c.vae
        latents = unpack_latents(state["latents"], state["latent_height"], state["latent_width"])
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        latents = latents.to(vae.dtype)
        # One row at a time: bounded activation memory, and each image is independent of its batch.
        images = [vae.decode(row.unsqueeze(0), return_dict=False)[0] for row in latents]
        pixels = (torch.cat(images) * 0.5 + 0.5).clamp(0, 1)
        state["images"] = pixels.cpu().permute(0, 2, 3, 1).float().numpy()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2x2 latent patches become tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a (latent) height and width."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (0, row, col) of each packed image token, for the rotary embedding."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)
