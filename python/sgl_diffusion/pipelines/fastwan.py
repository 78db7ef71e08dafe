"""FastWan: DMD-distilled Wan text-to-video (FastWan2.1-T2V-1.3B, FastWan2.2-TI2V-5B-FullAttn).

FastWan students are trained with distribution-matching distillation (DMD) to sample at a few fixed
timesteps (1000, 757, 522). At each one the DiT's flow prediction `v` gives the clean latent
`x0 = x_t - sigma_t * v`; unless it is the last step, `x0` is re-noised with *fresh* Gaussian noise to
the next timestep, `x_next = (1 - sigma_next) * x0 + sigma_next * noise`; the last `x0` is decoded.
There is no classifier-free guidance. This follows FastVideo's `DmdDenoisingStage` (also what
SGLang's multimodal_gen runs):

* `t` goes to the DiT as is (1000, 757, 522); `sigma_t` is looked up in the sigma table of a
  flow-match scheduler with shift 8.0 over 1000 training steps (the entry whose shifted timestep is
  nearest `t`), so sigma is 1.0, 0.75676, 0.52174 (t / 1000 snapped to that table's grid). FastVideo
  hard-codes shift 8.0 there for every DMD model, whatever the checkpoint's own flow_shift.
* Fresh noise comes from the same CPU generator as the initial noise, continued: FastVideo draws both
  from the request's `torch.Generator("cpu").manual_seed(seed)`. We do the same per request (each
  request keeps its own generator), so a request's output does not depend on its batch.

Where we differ from FastVideo, on purpose:

* Noise is drawn in diffusers' (B, C, T, H, W) float32 layout, as our other Wan pipelines draw the
  initial noise (same seed, same initial noise as `WanPipeline`); FastVideo draws (B, T, C, H, W) in
  bf16. The same seed therefore gives a different (equally valid) sample than FastVideo.
* Latents and the x0 / re-noising arithmetic stay in float32 between steps (diffusers' convention
  for Wan); FastVideo rounds them to bf16.

Requests: `num_inference_steps` must be the number of DMD timesteps (3); any other count is an error,
never silently replaced, since the student was trained for exactly these timesteps. `guidance_scale`
above 1 (CFG), a negative prompt and `flow_shift` are rejected for the same reason: none of them can act.

Attention: FastWan2.1-T2V-1.3B was trained with video sparse attention (VSA, sparsity 0.8 in FastVideo's
examples); `--attention-backend video_sparse_attn` runs it so, with the checkpoint's gates
(`blocks.N.to_gate_compress`) and `attention_backend_config={"VSA_sparsity": 0.8}`. With the default dense
attention its gates are unused (a warning says so) and the output is an approximation of the model as trained.
FastWan2.2-TI2V-5B-FullAttn was trained with full attention and runs exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import invalid_request
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers.dmd import DmdState, table_sigmas
from .base import BatchState
from .latents import draw_noise, request_generators
from .spec import PipelineSpec, SamplingDefaults
from .wan import TEXT_MAX_LENGTH, WanAdapter, WanComponents, WanPipeline

#: FastVideo's `dmd_denoising_steps` for FastWan2.1 and FastWan2.2 alike.
DMD_TIMESTEPS: tuple[int, ...] = (1000, 757, 522)
#: Shift of the flow-match sigma table that converts a DMD timestep into its sigma (see module doc).
DMD_SIGMA_TABLE_SHIFT = 8.0
NUM_TRAIN_TIMESTEPS = 1000

#: Model-card defaults (models.md). FastWan2.1 is 480p T2V; TI2V-5B-based FastWan2.2 is 704p.
FASTWAN21_DEFAULTS = SamplingDefaults(
    width=832, height=480, num_frames=81, fps=16, num_inference_steps=len(DMD_TIMESTEPS), guidance_scale=1.0,
    max_sequence_length=TEXT_MAX_LENGTH,
)  # fmt: skip
FASTWAN22_TI2V_5B_DEFAULTS = SamplingDefaults(
    width=1280, height=704, num_frames=121, fps=24, num_inference_steps=len(DMD_TIMESTEPS), guidance_scale=1.0,
    max_sequence_length=TEXT_MAX_LENGTH,
)  # fmt: skip


def dmd_sigmas(
    timesteps: tuple[int, ...] = DMD_TIMESTEPS,
    shift: float = DMD_SIGMA_TABLE_SHIFT,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[float]:
    """Sigma of each DMD timestep, looked up in FastVideo's shifted flow-match table (see the module doc)."""
    return table_sigmas(timesteps, shift, num_train_timesteps)


class FastWanAdapter(WanAdapter):
    """Wan's text inputs, latents, model inputs and decoding; DMD sampling, and no guidance."""

    def __init__(self, components: WanComponents, options: RuntimeOptions) -> None:
        super().__init__(components, options)
        self.dmd_timesteps = DMD_TIMESTEPS
        self.dmd_sigmas = dmd_sigmas(DMD_TIMESTEPS)

    def check_requests(self, requests: Sequence[Request]) -> None:
        """Rejects what a DMD student cannot honour."""
        super().check_requests(requests)
        timesteps = self.dmd_timesteps
        for request in requests:
            if request.num_inference_steps != len(timesteps):
                raise invalid_request(
                    "num_inference_steps",
                    f"FastWan is DMD-distilled to sample at exactly the timesteps {list(timesteps)}: "
                    f"num_inference_steps must be {len(timesteps)}, got {request.num_inference_steps}",
                )
            if request.cfg_enabled:
                raise invalid_request(
                    "guidance_scale",
                    "FastWan is DMD-distilled without classifier-free guidance: guidance_scale must be <= 1, "
                    f"got {request.guidance_scale}",
                )
            if request.negative_prompt:
                raise invalid_request(
                    "negative_prompt", "FastWan samples without classifier-free guidance: a negative prompt cannot act"
                )

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        # Each request's generator is kept: the sampler's fresh noise continues it (see the module doc).
        generators = request_generators(state.requests)
        state["noise_generators"] = generators
        shape = (self.c.vae.config.z_dim, *self.latent_grid(state.requests[0]))
        return draw_noise(state.requests, shape, generators=generators).to(state.device)

    def sampler(self, state: BatchState) -> DmdState:
        outputs = [request.num_outputs for request in state.requests]
        return DmdState(self.dmd_timesteps, self.dmd_sigmas, state["noise_generators"], outputs, state.device)


class FastWanPipeline(WanPipeline):
    """Wan DiT, text encoder and VAE as in `WanPipeline`; DMD sampling instead of UniPC + CFG.

    Chosen for a folder whose `model_index.json` says `WanDMDPipeline` (what FastVideo's FastWan
    checkpoints ship) and for the FastWan Hugging Face ids (`registry.PIPELINES_BY_ID`). Text-to-video
    only: the TI2V-5B student was distilled for text-to-video.
    """

    pipeline_class = "WanDMDPipeline"
    # FastWan students are Wan DiTs: Wan's LoRA layouts (lightx2v's, musubi's, ...) are theirs.
    lora_loader_class = "WanPipeline"

    def __init__(self, components: WanComponents, options: RuntimeOptions, defaults: SamplingDefaults) -> None:
        if components.transformer_2 is not None or components.image_encoder is not None:
            raise ValueError("FastWan (DMD) is supported for single-expert text-to-video Wan checkpoints only")
        if components.transformer.config.in_channels != components.vae.config.z_dim:
            raise ValueError("FastWan (DMD) is supported for text-to-video Wan checkpoints only")
        super().__init__(components, options, defaults)

    @classmethod
    def describe(cls, components: WanComponents, defaults: SamplingDefaults) -> PipelineSpec:
        # Text-to-video even from a TI2V-5B folder (the student was distilled for it), and the sigma table
        # is fixed by the distillation: a request's flow_shift could not act.
        return dataclasses.replace(
            super().describe(components, defaults),
            task="text-to-video",
            image_input="none",
            supports_flow_shift=False,
            supports_guidance_scale_2=False,
        )

    @classmethod
    def make_adapter(cls, components: WanComponents, options: RuntimeOptions) -> FastWanAdapter:
        return FastWanAdapter(components, options)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> WanPipeline:
        if defaults is None:
            # An unknown FastWan folder: the model card of the architecture it has (TI2V-5B or 2.1).
            index = json.loads((model_dir / "model_index.json").read_text())
            defaults = FASTWAN22_TI2V_5B_DEFAULTS if index.get("expand_timesteps") else FASTWAN21_DEFAULTS
        # WanPipeline.load builds the components and calls `cls(...)`: a FastWanPipeline.
        return super().load(model_dir, options, defaults)
