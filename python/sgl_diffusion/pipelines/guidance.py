"""Guiders: how one denoising step turns a batch's conditioning into one prediction.

A guider runs the denoiser once per guidance branch (or once over both, stacked along the batch) and
combines the branches. The loop calls `guider.predict(...)` every step and knows nothing of CFG. Inputs
that only the conditional branch takes (`ModelInputs.cond_only`) reach only its forward, and keep the two
branches in forwards of their own.

* `NoGuidance`: one forward with the prompts.
* `ClassifierFreeGuidance`: `uncond + scale * (cond - uncond)` with a per-row scale, one per expert. This
  is also *true CFG* (FLUX.1's `true_cfg_scale` against a negative prompt, on top of its embedded
  guidance): the arithmetic is the same; only which request field fills the scale differs, which the
  family decides when it builds the `Conditioning`.
* `NormPreservingCFG`: the same, rescaled so each token's prediction keeps the conditional branch's norm
  (diffusers' `QwenImagePipeline` true CFG).
* `ConditionalOffsetCFG`: `cond + scale * (cond - uncond)` in float32, with a per-row norm cap and per-step
  switch-off (diffusers' `ZImagePipeline`, its `cfg_normalization` and `cfg_truncation`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .conditioning import Conditioning, ModelInputs

#: A denoiser forward: keyword inputs to the prediction.
Denoiser = Callable[..., torch.Tensor]

#: Up to this many image/video tokens per sample, running the conditional and unconditional branches
#: as one batch-2 forward beats two batch-1 forwards (smaller GEMMs and attention leave the GPU partly
#: idle). Measured on an H100 with Wan2.1-1.3B: batch 2 is 6 % faster at 4 680 tokens, 2.5 % at 9 360,
#: 3.5 % at 17 160; FLUX.1-dev 13 % at 1 024 tokens, 4 % at 2 304 (benches/results/wan-forward.md,
#: flux-forward.md). Above the largest measured size batching only doubles activation memory.
CFG_BATCH_MAX_TOKENS = 17160


def use_batched_cfg(mode: str, tokens: int) -> bool:
    """Whether to run both guidance branches in one forward (`--cfg-batching auto|on|off`)."""
    if mode == "auto":
        return tokens <= CFG_BATCH_MAX_TOKENS
    return mode == "on"


def guided_forward(
    forward: Denoiser,
    *,
    rows: Mapping[str, torch.Tensor | None],
    cond: Mapping[str, torch.Tensor | None],
    uncond: Mapping[str, torch.Tensor | None],
    fixed: Mapping[str, Any],
    batched: bool,
    cond_only: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's conditional and unconditional predictions.

    `rows` are batch-first inputs both branches share (latents, timesteps), `cond`/`uncond` the
    batch-first inputs that differ (prompt embeddings), `fixed` inputs without a batch dimension
    (position ids), `cond_only` inputs without a batch dimension that only the conditional branch takes
    (`ModelInputs.cond_only`). Batched, the branches are stacked along the batch dimension into one
    forward, unless there are `cond_only` inputs: then the branches' sequences differ and they run apart.
    """
    if not batched or cond_only:
        return forward(**rows, **cond, **fixed, **(cond_only or {})), forward(**rows, **uncond, **fixed)
    stacked_rows = {key: None if value is None else torch.cat([value, value]) for key, value in rows.items()}
    stacked = {key: torch.cat([cond[key], uncond[key]]) for key in cond}  # type: ignore[list-item]
    both = forward(**stacked_rows, **stacked, **fixed)
    positive, negative = both.chunk(2)
    return positive, negative


class Guider(abc.ABC):
    """Turns one step's inputs and the batch's conditioning into the prediction the sampler steps with."""

    @abc.abstractmethod
    def predict(self, denoiser: Denoiser, inputs: ModelInputs, conditioning: Conditioning, expert: int) -> torch.Tensor:
        """The guided prediction of `denoiser` (the step's expert, index `expert`) for the current rows."""


class NoGuidance(Guider):
    """One forward with the prompts' inputs."""

    def predict(self, denoiser: Denoiser, inputs: ModelInputs, conditioning: Conditioning, expert: int) -> torch.Tensor:
        return denoiser(
            **inputs.rows, **conditioning.shared, **conditioning.positive, **inputs.fixed, **inputs.cond_only
        )


class ClassifierFreeGuidance(Guider):
    """`uncond + scale * (cond - uncond)`, each row with its own scale for the step's expert.

    `batched` runs both branches as one forward (see `use_batched_cfg`); the result is the same up to
    the last bits of differently blocked matrix products."""

    def __init__(self, batched: bool) -> None:
        self.batched = batched

    def predict(self, denoiser: Denoiser, inputs: ModelInputs, conditioning: Conditioning, expert: int) -> torch.Tensor:
        if conditioning.negative is None:
            raise ValueError("classifier-free guidance needs the negative prompts' inputs; the conditioning has none")
        positive, negative = guided_forward(
            denoiser,
            rows={**inputs.rows, **conditioning.shared},
            cond=conditioning.positive,
            uncond=conditioning.negative,
            fixed=inputs.fixed,
            batched=self.batched,
            cond_only=inputs.cond_only,
        )
        return self.combine(positive, negative, conditioning.cfg_scales[expert])

    def combine(self, positive: torch.Tensor, negative: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`negative + scale * (positive - negative)` with the (B,) scale broadcast over each row and cast to
        the prediction's dtype first (a float32 scale does not promote a bf16 prediction)."""
        scale = scale.view(-1, *([1] * (negative.ndim - 1))).to(negative.dtype)
        return negative + scale * (positive - negative)


class NormPreservingCFG(ClassifierFreeGuidance):
    """Classifier-free guidance whose result keeps, per token (last dimension), the norm of the conditional
    prediction: `comb * (|cond| / |comb|)`, as diffusers' `QwenImagePipeline` runs true CFG. Large scales
    then steer the direction without inflating the prediction."""

    def combine(self, positive: torch.Tensor, negative: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        combined = super().combine(positive, negative, scale)
        positive_norm = torch.norm(positive, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return combined * (positive_norm / combined_norm)


class ConditionalOffsetCFG(Guider):
    """Classifier-free guidance counted from the conditional prediction, as diffusers' `ZImagePipeline` runs it:
    per row, `cond + scale * (cond - uncond)` in float32 (a scale of 0 is the conditional prediction, so the
    engine turns guidance on for any scale above 0).

    The step's `inputs.guidance` says per row (CPU tensors, so deciding never waits for the GPU):

    * `"active"` (bool): whether the row is still guided at this step (`cfg_truncation` ends guidance late in
      the schedule); an inactive row takes its conditional prediction, and a step without active rows skips
      the unconditional forward;
    * `"normalization"` (float): above 0, the result's norm over the whole sample is capped at this multiple
      of the conditional prediction's norm (`cfg_normalization`); 0 leaves it as it is.

    The per-sample norms are taken one row at a time, as the reference does, so their rounding matches.
    """

    def __init__(self, batched: bool) -> None:
        self.batched = batched

    def predict(self, denoiser: Denoiser, inputs: ModelInputs, conditioning: Conditioning, expert: int) -> torch.Tensor:
        if conditioning.negative is None:
            raise ValueError("classifier-free guidance needs the negative prompts' inputs; the conditioning has none")
        active: torch.Tensor = inputs.guidance["active"]
        if not bool(active.any()):
            conditional = {**inputs.rows, **conditioning.shared, **conditioning.positive, **inputs.fixed}
            return denoiser(**conditional, **inputs.cond_only).float()
        positive, negative = guided_forward(
            denoiser,
            rows={**inputs.rows, **conditioning.shared},
            cond=conditioning.positive,
            uncond=conditioning.negative,
            fixed=inputs.fixed,
            batched=self.batched,
            cond_only=inputs.cond_only,
        )
        positive, negative = positive.float(), negative.float()
        scale = conditioning.cfg_scales[expert].view(-1, *([1] * (positive.ndim - 1))).float()
        guided = positive + scale * (positive - negative)
        caps: torch.Tensor = inputs.guidance["normalization"]
        if bool((caps > 0).any()):
            guided = torch.stack(
                [
                    self._cap_norm(cond, row, cap) if cap > 0 else row
                    for cond, row, cap in zip(positive, guided, caps.tolist(), strict=True)
                ]
            )
        if not bool(active.all()):
            guided = torch.where(active.to(guided.device).view_as(scale), guided, positive)
        return guided

    @staticmethod
    def _cap_norm(positive: torch.Tensor, guided: torch.Tensor, cap: float) -> torch.Tensor:
        """`guided` scaled down to `cap` times `positive`'s norm where it is longer (no host sync)."""
        limit = torch.linalg.vector_norm(positive) * cap
        norm = torch.linalg.vector_norm(guided)
        return torch.where(norm > limit, guided * (limit / norm), guided)
