"""What a denoiser is called with: the prompt's inputs per guidance branch, and one step's other inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

#: Batch-first denoiser inputs by keyword (None: an optional input the model does not take here).
RowInputs = Mapping[str, torch.Tensor | None]


def _select(inputs: RowInputs, keep: torch.Tensor) -> dict[str, torch.Tensor | None]:
    return {key: None if value is None else value[keep.to(value.device)] for key, value in inputs.items()}


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The denoiser inputs a batch's prompts give, one row per output.

    `positive` are the prompts' inputs (text embeddings), `negative` the negative prompts' for
    classifier-free guidance (None without it). `shared` are inputs both branches take that come from
    the request's guidance settings (FLUX's embedded guidance scale). `cfg_scales` holds each row's
    classifier-free guidance scale, one tensor per expert (Wan2.2 A14B: `guidance_scale`,
    `guidance_scale_2`); empty without guidance.
    """

    positive: RowInputs
    negative: RowInputs | None = None
    shared: RowInputs = dataclasses.field(default_factory=dict)
    cfg_scales: tuple[torch.Tensor, ...] = ()

    @property
    def num_rows(self) -> int:
        return int(next(iter(self.positive.values())).shape[0])  # type: ignore[union-attr]

    def select_rows(self, keep: torch.Tensor) -> Conditioning:
        """Only the rows `keep` (a boolean mask) marks, e.g. after requests were cancelled."""
        return Conditioning(
            positive=_select(self.positive, keep),
            negative=None if self.negative is None else _select(self.negative, keep),
            shared=_select(self.shared, keep),
            cfg_scales=tuple(scale[keep.to(scale.device)] for scale in self.cfg_scales),
        )


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One step's denoiser inputs besides the prompt's: `rows` are batch-first (latents, timesteps, image
    tokens), `fixed` have no batch dimension (position ids) and are the same for every row and branch.
    `cond_only` have no batch dimension either but reach only the conditional branch (the prompts'), which
    the unconditional branch runs without (GLM-Image's keys and values of the input images: diffusers
    reads them in the conditional forward and skips them in the unconditional one). The two branches then
    differ in more than their rows, so a guider runs them as two forwards while there are any, even where
    it would stack them. `guidance` holds the step's settings for the guider, never passed to the denoiser
    (Z-Image: which rows are still guided at this timestep)."""

    rows: RowInputs
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cond_only: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    guidance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
