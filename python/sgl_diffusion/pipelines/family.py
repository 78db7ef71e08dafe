"""A model family as the engine sees it: a small adapter under the engine's own stages and loop.

The engine's stages (`stages.py`) and loop (`loop.py`) do everything families share: the batch checks,
assembling prompts and negative prompts per output row, guidance, the denoising loop, decoding each row.
A family supplies only what differs, through `FamilyAdapter`:

* `encode_prompts`: its text encoders, texts to the denoiser's text inputs;
* `guidance_inputs` / `cfg_scales`: what the request's guidance settings feed the denoiser;
* `initial_latents`, `sampler`: the starting noise in the family's latent layout, the schedule;
* `experts`, `expert_for`, `model_inputs`: which denoiser runs a step and with what (packing, position
  ids, per-token timesteps, the image condition);
* optionally `denoiser`: how the guider calls an expert (by default the module itself; Qwen-Image runs
  rows of equal prompt length together, `text_lengths.py`);
* `decode`: latents to pixels;
* optionally `check_requests`, `encode_images`, `guider`.

A family's module holds its adapter and a `FamilyPipeline` subclass whose `load` builds both. Families
never import each other; what two of them share lives in a shared module (`latents.py`, ...).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from .base import BatchState, ProgressFn, Stage, StagedPipeline
from .conditioning import ModelInputs, RowInputs
from .guidance import ClassifierFreeGuidance, Denoiser, Guider, NoGuidance
from .hooks import LoopHooks
from .loop import Sampler
from .spec import PipelineSpec
from .stages import standard_stages


class FamilyAdapter(abc.ABC):
    """What one model family supplies to the engine's stages and loop (see the module docstring).

    Methods that take the `BatchState` may keep family-specific entries in it (e.g. position ids next
    to the latents); row-aligned ones go through `state.set_rows` so cancelled requests leave them too.
    """

    def check_requests(self, requests: Sequence[Request]) -> None:
        """Rejects requests this family cannot honour beyond what the core checks (raise
        `errors.invalid_request`); the default accepts every request."""
        del requests

    @abc.abstractmethod
    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        """The denoiser's text inputs by keyword, one row per text, in the denoiser's dtype. `owners[i]` is
        the request text i belongs to, for families whose prompt encoding also reads the request (its input
        images); text-only families ignore it."""

    def guidance_inputs(self, rows: Sequence[Request], device: torch.device) -> RowInputs:
        """Inputs both guidance branches take from the request's guidance settings, one row per output
        (`rows[i]` is output row i's request): FLUX's embedded guidance scale. None by default."""
        del rows, device
        return {}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        """Each output row's classifier-free guidance scale, one (B,) tensor per expert (asked only for
        batches with guidance on)."""
        raise NotImplementedError(f"{type(self).__name__} runs no classifier-free guidance")

    def guider(self, cfg: bool, batched: bool) -> Guider:
        """How a step combines guidance branches; `batched` runs both branches as one forward."""
        return ClassifierFreeGuidance(batched) if cfg else NoGuidance()

    def encode_images(self, state: BatchState) -> None:
        """Image conditioning of a batch whose requests bring an input image, into `state` (called only for
        pipelines whose spec takes images)."""
        raise NotImplementedError(f"{type(self).__name__} takes no input image")

    @abc.abstractmethod
    def initial_latents(self, state: BatchState) -> torch.Tensor:
        """The batch's starting noise, one row per output, each request's from its own seed."""

    @abc.abstractmethod
    def sampler(self, state: BatchState) -> Sampler:
        """The batch's stepping state over its schedule (every request of a batch shares the schedule)."""

    @property
    @abc.abstractmethod
    def experts(self) -> Sequence[torch.nn.Module]:
        """The denoisers, in the order `expert_for` indexes them (what `--enable-torch-compile` compiles)."""

    def denoiser(self, expert: int) -> Denoiser:
        """What the guider calls for expert `expert` with a step's keyword inputs: the module itself unless the
        family must shape the call (e.g. `text_lengths.ByTextLength`). `experts` stay the modules, so
        compilation and CUDA graphs act on the same forward either way."""
        return self.experts[expert]

    def expert_for(self, timestep: torch.Tensor) -> int:
        """The index of the expert that denoises at `timestep` (and whose CFG scale applies)."""
        del timestep
        return 0

    @abc.abstractmethod
    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        """One step's denoiser inputs besides the prompt's, for the current `latents` at `timestep`."""

    @abc.abstractmethod
    def decode(self, state: BatchState) -> np.ndarray:
        """The denoised `state["latents"]` as float32 pixels in [0, 1]: (B, H, W, 3) images or
        (B, T, H, W, 3) videos."""


class FamilyPipeline(StagedPipeline):
    """A pipeline made of the engine's standard stages over one family's adapter."""

    #: The diffusers pipeline class (`model_index.json` `_class_name`) this loader serves: the registry's key,
    #: and its spec's `pipeline_class`.
    pipeline_class: ClassVar[str]
    #: The diffusers pipeline class whose LoRA loader reads this family's LoRA files (its `lora_state_dict`
    #: knows their layouts); None: `pipeline_class` itself.
    lora_loader_class: ClassVar[str | None] = None

    def __init__(self, spec: PipelineSpec, adapter: FamilyAdapter, options: RuntimeOptions) -> None:
        super().__init__(spec, options)
        self.adapter = adapter

    def denoisers(self) -> list[torch.nn.Module]:
        return list(self.adapter.experts)

    def stages(self, progress: ProgressFn, hooks: LoopHooks) -> list[Stage]:
        return standard_stages(self.spec, self.adapter, self.options, progress, hooks)
