"""Qwen-Image text-to-image (Qwen/Qwen-Image, Qwen/Qwen-Image-2512): its family adapter and pipeline.

Matches diffusers' `QwenImagePipeline` on the same weights and seed: Qwen2.5-VL hidden states of the
templated prompt (`models/qwen_image/text_encoder.py`), noise drawn per request from a CPU generator and
packed in 2x2 latent patches as FLUX's are, flow-match Euler with the dynamic exponential shift from the
image's token count, and true CFG against a negative prompt with the norm-preserving combination
(`guidance.NormPreservingCFG`) when `true_cfg_scale > 1`. No guidance embedding: the Rust core refuses
`guidance_scale` for this pipeline. The VAE is diffusers' `AutoencoderKLQwenImage` (Wan-style, 3D with
one frame).

Prompts keep only their real tokens, so prompts (and a prompt and its negative prompt) differ in length;
rows of equal length run together, each group without padding (`text_lengths.py`), which keeps every
output equal to its request run alone and to diffusers'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.qwen_image import QwenImageTransformer2DModel, encode_prompts
from ..models.qwen_image.prompt import MAX_PROMPT_TOKENS
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from ..schedulers.flow_match_euler import FlowMatchEulerState
from .base import BatchState
from .conditioning import ModelInputs
from .family import FamilyAdapter, FamilyPipeline
from .guidance import Denoiser, Guider, NoGuidance, NormPreservingCFG
from .latents import denormalize_latents, draw_noise, pack_latents, unpack_latents
from .spec import PipelineSpec, SamplingDefaults, image_limits, tokenizer_limit
from .text_lengths import TEXT_LENGTHS, ByTextLength, each_text_once, pad_text_rows

#: Largest image we accept (4 MP). Qwen-Image's published sizes reach 1.8 MP (1328x1328, 1664x928); its
#: RoPE tables (+-4096 positions per axis) would allow far more than one forward's memory does.
MAX_PIXELS = 2048 * 2048
#: Longest side: a 4:1 strip at the pixel bound.
MAX_SIDE = 4096
#: QwenImagePipeline.__call__'s defaults, for folders that are no known checkpoint.
DIFFUSERS_SAMPLE_SIZE = 128  # latent pixels per side: 1024 px with the 8x VAE
DIFFUSERS_STEPS = 50
DIFFUSERS_TRUE_CFG_SCALE = 4.0
DIFFUSERS_MAX_SEQUENCE_LENGTH = 512
#: The model takes no guidance scale (the core refuses one in requests); a neutral value fills the field.
NO_GUIDANCE_SCALE = 1.0

#: Qwen/Qwen-Image and Qwen/Qwen-Image-2512 (one architecture, one model card): 1328x1328, 50 steps, true CFG 4
#: against the negative prompt " " (what the card and SGLang run; a request's true_cfg_scale 1 turns it off).
QWEN_IMAGE_DEFAULTS = SamplingDefaults(
    width=1328,
    height=1328,
    num_inference_steps=50,
    guidance_scale=NO_GUIDANCE_SCALE,
    max_sequence_length=DIFFUSERS_MAX_SEQUENCE_LENGTH,
    true_cfg_scale=4.0,
    negative_prompt=" ",
)


@dataclasses.dataclass
class QwenImageComponents:
    tokenizer: Any
    text_encoder: Qwen2_5_VLForConditionalGeneration
    transformer: QwenImageTransformer2DModel
    vae: AutoencoderKLQwenImage
    scheduler: FlowMatchEulerScheduler
    vae_scale_factor: int


class QwenImageAdapter(FamilyAdapter):
    """Qwen-Image under the engine's stages: Qwen2.5-VL text rows of each prompt's own length, 2x2-packed
    latents, the token layout (`img_shapes`) for the 3-axis RoPE, norm-preserving true CFG."""

    def __init__(self, components: QwenImageComponents) -> None:
        self.c = components
        self.dtype = components.transformer.img_in.weight.dtype
        self.by_text_length = ByTextLength(components.transformer)

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

        # Each distinct text alone, as diffusers encodes a request's prompt and its negative prompt (" ", shared).
        def encode(text: str) -> torch.Tensor:
            encoded = encode_prompts(
                self.c.text_encoder,
                self.c.tokenizer,
                [text],
                max_sequence_length=max_sequence_length,
                device=device,
                dtype=self.dtype,
            )
            return encoded.embeds[0]

        embeds, lengths = pad_text_rows(each_text_once(texts, encode))
        return {"encoder_hidden_states": embeds, TEXT_LENGTHS: lengths}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        # In the transformer's dtype, as diffusers multiplies its predictions by the Python float.
        return (torch.tensor([r.true_cfg_scale for r in rows], dtype=self.dtype, device=device),)

    def guider(self, cfg: bool, batched: bool) -> Guider:
        return NormPreservingCFG(batched) if cfg else NoGuidance()

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        channels = self.c.transformer.config.in_channels // 4
        height, width = self.latent_size(state.requests[0])
        # diffusers draws (B, 1, C, H, W) (the VAE's one frame) in the prompt embeddings' dtype, which is the
        # transformer's whenever its pipeline runs at all, then packs the same values as (B, C, H, W).
        noise = draw_noise(state.requests, (1, channels, height, width), self.dtype).to(state.device)
        state["img_shapes"] = [[(1, height // 2, width // 2)]]  # one layout for every row of the batch
        return pack_latents(noise[:, 0])

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        # diffusers' mu from the packed token count, sigmas linspace(1, 1/N, N), stretched to shift_terminal.
        image_seq_len = state["latents"].shape[1]
        steps = state.requests[0].num_inference_steps
        timesteps, sigmas = self.c.scheduler.plan(steps, image_seq_len, device=state.device)
        return self.c.scheduler.start(timesteps, sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.c.transformer]

    def denoiser(self, expert: int) -> Denoiser:
        del expert  # one expert
        return self.by_text_length

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        # diffusers casts t to the latent dtype before dividing; keep that rounding.
        rows = {"hidden_states": latents, "timestep": timestep.expand(latents.shape[0]).to(latents.dtype) / 1000}
        return ModelInputs(rows=rows, fixed={"img_shapes": state["img_shapes"]})

    def decode(self, state: BatchState) -> np.ndarray:
        vae = self.c.vae
        # (B, C, 1, H, W): the Wan-style VAE decodes a one-frame video.
        latents = unpack_latents(state["latents"], *self.latent_size(state.requests[0])).unsqueeze(2)
        latents = denormalize_latents(latents.to(vae.dtype), vae.config.latents_mean, vae.config.latents_std)
        # One row at a time: bounded activation memory, and each image is independent of its batch.
        images = [vae.decode(row.unsqueeze(0), return_dict=False)[0][:, :, 0] for row in latents]
        pixels = (torch.cat(images) * 0.5 + 0.5).clamp(0, 1)
        return pixels.cpu().permute(0, 2, 3, 1).float().numpy()


class QwenImagePipeline(FamilyPipeline):
    pipeline_class = "QwenImagePipeline"

    def __init__(self, components: QwenImageComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        token = components.vae_scale_factor * 2  # 8x VAE, then 2x2 latent packing
        limits = image_limits(
            token=token,
            max_side=MAX_SIDE,
            max_pixels=MAX_PIXELS,
            max_sequence_length=tokenizer_limit(components.tokenizer, MAX_PROMPT_TOKENS),
            max_steps=components.scheduler.config.num_train_timesteps,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="qwen_image",
            task="text-to-image",
            guidance_mode="true_cfg",
            limits=limits,
            defaults=defaults,
        )
        super().__init__(spec, QwenImageAdapter(components), options)
        self.c = components

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> QwenImagePipeline:
        def build_transformer(config: dict) -> QwenImageTransformer2DModel:
            return QwenImageTransformer2DModel.from_config(config, attention_backend=options.attention_backend)

        vae = load_pipeline_vae(AutoencoderKLQwenImage, model_dir, options)
        (text_encoder_dtype,) = options.text_encoder_dtypes_for(("text_encoder (Qwen2.5-VL)",))
        components = QwenImageComponents(
            tokenizer=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
            text_encoder=load_transformers_model(
                Qwen2_5_VLForConditionalGeneration, model_dir / "text_encoder", options.device, text_encoder_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            # diffusers: 2 ** len(temperal_downsample), 8 for every Qwen-Image VAE.
            vae_scale_factor=2 ** len(vae.config.temperal_downsample),
        )
        if defaults is None:
            defaults = diffusers_defaults(components)
        return cls(components, options, defaults)


def diffusers_defaults(components: QwenImageComponents) -> SamplingDefaults:
    """QwenImagePipeline.__call__'s own defaults, for folders that are no known checkpoint: 1024x1024, 50
    steps, true_cfg_scale 4 but no negative prompt, so no CFG unless a request brings one (diffusers then
    warns and runs without it)."""
    size = DIFFUSERS_SAMPLE_SIZE * components.vae_scale_factor
    return SamplingDefaults(
        width=size,
        height=size,
        num_inference_steps=DIFFUSERS_STEPS,
        guidance_scale=NO_GUIDANCE_SCALE,
        max_sequence_length=DIFFUSERS_MAX_SEQUENCE_LENGTH,
        true_cfg_scale=DIFFUSERS_TRUE_CFG_SCALE,
        negative_prompt=None,
    )
