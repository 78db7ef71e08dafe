"""The engine's standard stages: what every family's batch goes through, each written once.

input validation → text encoding → (image encoding) → latent preparation → timestep preparation →
denoising → decoding. Each stage calls the family's adapter for what differs between families.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import invalid_request
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from .base import BatchState, ProgressFn, Stage, per_row
from .conditioning import Conditioning
from .guidance import use_batched_cfg
from .hooks import LoopHooks
from .loop import DenoisingLoop
from .spec import PipelineSpec

if TYPE_CHECKING:
    from .family import FamilyAdapter

#: The request fields of `sgl_core::BatchKey`: the scheduler batches only requests that agree on them (they
#: set tensor shapes and the schedule), and the stages rely on that. Whether a request brings an image is
#: the key's last part (checked apart: the paths differ).
BATCH_KEY_FIELDS = (
    "width",
    "height",
    "num_frames",
    "num_inference_steps",
    "max_sequence_length",
    "cfg_enabled",
    "flow_shift",
)


def shared_value(requests: Sequence[Request], field: str) -> object:
    """A field every request of a batch has in common (the scheduler batches by these)."""
    values = {getattr(r, field) for r in requests}
    if len(values) != 1:
        raise RuntimeError(f"the scheduler batched requests with different {field}: {sorted(map(str, values))}")
    return values.pop()


class AdapterStage(Stage):
    def __init__(self, adapter: FamilyAdapter) -> None:
        self.adapter = adapter


class CheckBatch(AdapterStage):
    """Input validation: the core already checked each request; the family may refuse more, and the batch
    must share its batch key."""

    name = "input_validation"

    def __init__(self, adapter: FamilyAdapter, spec: PipelineSpec) -> None:
        super().__init__(adapter)
        self.key_fields = (*BATCH_KEY_FIELDS, *spec.extra_batch_key_fields)
        self.spec = spec

    def run(self, state: BatchState) -> None:
        if not self.spec.takes_prior_token_ids and any(r.prior_token_ids for r in state.requests):
            raise invalid_request(
                "prior_token_ids", f"{self.spec.pipeline_class} has no autoregressive prior to give tokens to"
            )
        self.adapter.check_requests(state.requests)
        for field in self.key_fields:
            shared_value(state.requests, field)
        if len({r.image_path is None for r in state.requests}) != 1:
            raise RuntimeError("the scheduler batched image-conditioned and text-only requests together")


class EncodePrompts(AdapterStage):
    """The prompts (and, with classifier-free guidance, the negative prompts) encoded in one call, then
    repeated once per output of each request; plus each row's guidance inputs and scales."""

    name = "text_encoding"
    outputs = ("conditioning",)

    def run(self, state: BatchState) -> None:
        requests = state.requests
        cfg = requests[0].cfg_enabled
        texts = [r.prompt for r in requests] + ([r.negative_prompt or "" for r in requests] if cfg else [])
        owners = requests + (requests if cfg else [])
        encoded = self.adapter.encode_prompts(texts, requests[0].max_sequence_length, state.device, owners)
        n = len(requests)
        rows = [requests[owner] for owner in state.row_owner.tolist()]
        conditioning = Conditioning(
            positive={key: per_row(value[:n], requests) for key, value in encoded.items()},
            negative={key: per_row(value[n:], requests) for key, value in encoded.items()} if cfg else None,
            shared=self.adapter.guidance_inputs(rows, state.device),
            cfg_scales=self.adapter.cfg_scales(rows, state.device) if cfg else (),
        )
        state.set_rows("conditioning", conditioning)


class EncodeImages(AdapterStage):
    """Image conditioning, for a batch whose requests bring an input image."""

    name = "image_encoding"

    def run(self, state: BatchState) -> None:
        if state.requests[0].image_path is not None:
            self.adapter.encode_images(state)


class PrepareLatents(AdapterStage):
    """Initial noise, drawn per request from its own seed: a request's output does not depend on its batch."""

    name = "latent_preparation"
    outputs = ("latents",)

    def run(self, state: BatchState) -> None:
        state.set_rows("latents", self.adapter.initial_latents(state))


class PrepareTimesteps(AdapterStage):
    name = "timestep_preparation"
    inputs = ("latents",)
    outputs = ("sampler",)

    def run(self, state: BatchState) -> None:
        state["sampler"] = self.adapter.sampler(state)


class Denoise(AdapterStage):
    name = "denoising"
    inputs = ("latents", "conditioning", "sampler")
    outputs = ("latents",)

    def __init__(self, adapter: FamilyAdapter, loop: DenoisingLoop, cfg_batching: str) -> None:
        super().__init__(adapter)
        self.loop = loop
        self.cfg_batching = cfg_batching

    def run(self, state: BatchState) -> None:
        conditioning: Conditioning = state["conditioning"]
        tokens = self.adapter.experts[0].tokens_per_sample(state["latents"])
        guider = self.adapter.guider(conditioning.negative is not None, use_batched_cfg(self.cfg_batching, tokens))
        self.loop.run(state, self.adapter, state["sampler"], guider)


class Decode(AdapterStage):
    """The denoised latents to pixels, into the spec's output entry (`images` or `videos`)."""

    name = "decoding"
    inputs = ("latents",)

    def __init__(self, adapter: FamilyAdapter, output_key: str) -> None:
        super().__init__(adapter)
        self.output_key = output_key
        self.outputs = (output_key,)

    def run(self, state: BatchState) -> None:
        state[self.output_key] = self.adapter.decode(state)


def standard_stages(
    spec: PipelineSpec, adapter: FamilyAdapter, options: RuntimeOptions, progress: ProgressFn, hooks: LoopHooks
) -> list[Stage]:
    """The stages of one batch, in order; `progress` is the batch's step callback, `hooks` the loop's features."""
    image_stages: list[Stage] = [] if spec.image_input == "none" else [EncodeImages(adapter)]
    return [
        CheckBatch(adapter, spec),
        EncodePrompts(adapter),
        *image_stages,
        PrepareLatents(adapter),
        PrepareTimesteps(adapter),
        Denoise(adapter, DenoisingLoop(progress, hooks), options.cfg_batching),
        Decode(adapter, spec.output_key),
    ]
